"""Ship a quantized merged model in formats other tools load: ``epmq`` (our packed layout), ``gptq``
(AutoGPTQ / GPTQModel / transformers / vLLM checkpoint format) and ``compressed-tensors`` (``pack-quantized``:
what llm-compressor writes and vLLM loads).

Both foreign formats store the *same bit stream* as :func:`epmq.quant.packed.pack_codes`: a weight row's codes,
least significant bit first, are one continuous stream.

GPTQ (``checkpoint_format: gptq``, "v1"), per quantized ``nn.Linear`` ``<m>``
    * ``<m>.qweight`` int32 ``(in * bits / 32, out)``: packed along the *input* dimension. Column ``o`` holds
      output row ``o``'s stream; word ``r`` is stream bits ``[32 r, 32 r + 32)``, little-endian. For 2, 4, 8
      bits code ``i`` sits in bits ``(i % (32/bits)) * bits`` of word ``i // (32/bits)``; for 3 bits every
      32 codes fill 3 words and codes 10 and 21 straddle two words (AutoGPTQ's 3-bit layout). So it is our
      per-row stream viewed as int32 and transposed (``in * bits`` must be a multiple of 32).
    * ``<m>.qzeros`` int32 ``(groups, out * bits / 32)``: the zero points packed the same way along the
      *output* dimension, stored as ``zero - 1`` (v1's convention; loaders add 1 back). A zero point of 0 has
      no v1 encoding: such a model is refused with a pointer to ``checkpoint_format: gptq_v2`` (GPTQModel's
      v2 stores zero points as they are) or ``sym: true``.
    * ``<m>.scales`` float16 ``(groups, out)``: **the one lossy step**, our float32 scales rounded to fp16
      (relative error <= 2**-11 per scale; the dequantized weight then differs from ours by at most
      ``|code - zero| * |scale - fp16(scale)|``); ``<m>.g_idx`` int32 ``(in,)``: each input column's group.
    * ``quantization_config`` in ``config.json`` (and the same dict in ``quantize_config.json`` for older
      AutoGPTQ): ``quant_method: gptq``, ``bits``, ``group_size``, ``desc_act`` (true when a ``g_idx`` is not
      the contiguous ``arange(in) // group_size``: act-order groups), ``static_groups``, ``sym``,
      ``checkpoint_format``.
    Dequantization (any GPTQ loader): ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qz[g_idx[i], o] + 1))``.
    Widths 2, 3, 4, 8 only (5-7 bits have no GPTQ kernel or packing); Linears only.

compressed-tensors (``format: pack-quantized``), per quantized ``nn.Linear`` ``<m>``
    * ``<m>.weight_packed`` int32 ``(out, ceil(in * bits / 32))``: the row's stream, zero-padded to a whole
      int32 (codes are the signed values ``q - 2**(bits-1)`` offset back by ``2**(bits-1)``: the same bits);
    * ``<m>.weight_scale`` ``(out, groups)`` in ``scale_dtype`` (default float32: exact; float16/bfloat16
      round like GPTQ's scales); ``<m>.weight_zero_point`` int32 ``(ceil(out * bits / 32), groups)`` (asymmetric
      grids only, packed along the output dimension); ``<m>.weight_shape`` int64 ``[out, in]``.
    * ``quantization_config``: one config group, targets ``Linear``, W-only int with ``strategy`` ``channel``
      (group_size -1) or ``group``; Linears left in full precision are listed in ``ignore``.
    Dequantization: ``W = (q - zp) * scale`` with contiguous groups: the format has no ``g_idx`` (its
    ``actorder: group`` is deprecated), so act-order groups that are not contiguous are refused (quantize with
    ``static_groups: true``); ``in`` must be a multiple of ``group_size``. Any width 2-8 decompresses; vLLM's
    kernels take 4 and 8.

Both: only weights of ``nn.Linear`` modules (a fused ``nn.MultiheadAttention.in_proj_weight``, as in open_clip
layouts, is refused: export the HF CLIP layout, whose q/k/v are separate Linears); a refitted bias must land on a
Linear that has one; every other tensor is stored as is, in its dtype.

The folder (:func:`export_model`): ``model.safetensors`` (safetensors only), ``config.json`` (HF models; with
``quantization_config`` for gptq / compressed-tensors), the processor / tokenizer files and task heads passed in
``assets``, ``README.md`` (a model card with YAML metadata, :func:`model_card`) and ``export.json`` (what was
written, sizes). ``huggingface-cli upload <repo> <folder>`` uploads it as is.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from epmq.errors import EPMQError
from epmq.io import atomic_path
from epmq.quant.packed import pack_codes, packed_row_bytes
from epmq.quant.result import QuantResult

FORMATS = ("epmq", "gptq", "compressed-tensors")
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the compressed-tensors release whose decompressor the tests check these files against
CT_VERSION = "0.20.1"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "export.json"


class ExportError(EPMQError):
    """A model or setting the chosen format cannot express (the message says which layout can)."""


# ------------------------------------------------------------------------------------------- helpers


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise ExportError("int32 packing assumes a little-endian host (GPTQ and compressed-tensors files are)")


def _stream_words(codes: torch.Tensor, bits: int, *, name: str, exact: bool) -> torch.Tensor:
    """Rows of ``codes`` as LSB-first bit streams in int32 words: ``(rows, ceil(cols * bits / 32))``.
    ``exact``: ``cols * bits`` must fill whole words (GPTQ); else the stream is zero-padded (compressed-tensors)."""
    _check_little_endian()
    rows, cols = codes.shape
    if exact and (cols * bits) % 32:
        raise ExportError(f"{name}: {cols} values x {bits} bits is not a whole number of int32 words")
    packed = pack_codes(codes, bits, name=name)  # (rows, ceil(cols*bits/8)) uint8
    nwords = -(-cols * bits // 32)
    pad = nwords * 4 - packed_row_bytes(cols, bits)
    if pad:
        packed = torch.cat([packed, packed.new_zeros(rows, pad)], dim=1)
    return packed.contiguous().view(torch.int32)


def _integer_zeros(name: str, r: QuantResult) -> torch.Tensor:
    z = r.zeros.detach().float().cpu()
    maxq = 2**r.bits - 1
    if not torch.equal(z, torch.round(z)) or (z.numel() and (z.min() < 0 or z.max() > maxq)):
        raise ExportError(f"{name}: zero points are not integers in [0, {maxq}]; neither GPTQ nor "
                          "compressed-tensors can store them (use --format epmq)")
    return z.to(torch.int32)


def contiguous_g_idx(cols: int, group_size: int) -> torch.Tensor:
    """``g_idx`` of natural-order groups: ``arange(cols) // group_size`` (all zeros for ``group_size`` -1)."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.int32)
    return (torch.arange(cols) // group_size).to(torch.int32)


def _codes(r: QuantResult) -> torch.Tensor:
    return r.codes.detach().cpu()


# ------------------------------------------------------------------------------------------------ GPTQ


def gptq_tensors(name: str, r: QuantResult, *, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """One Linear's GPTQ tensors ``{qweight, qzeros, scales, g_idx}`` (module docstring) from our result."""
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ExportError(f"checkpoint_format={checkpoint_format!r}: expected one of {list(GPTQ_CHECKPOINT_FORMATS)}")
    if r.bits not in GPTQ_BITS:
        raise ExportError(f"{name}: {r.bits}-bit weights have no GPTQ packing (2, 3, 4, 8 bits only); "
                          "quantize at 2/3/4/8 bits or export --format compressed-tensors / epmq")
    rows, cols = r.weight.shape
    if (cols * r.bits) % 32 or (rows * r.bits) % 32:
        raise ExportError(f"{name}: GPTQ packs {32 // math.gcd(32, r.bits)} values per int32 word group; "
                          f"shape ({rows}, {cols}) at {r.bits} bits does not fill whole words "
                          "(export --format compressed-tensors or epmq)")
    zeros = _integer_zeros(name, r)
    if checkpoint_format == "gptq":
        if zeros.numel() and int(zeros.min()) < 1:
            n = int((zeros < 1).sum())
            raise ExportError(f"{name}: {n} zero point(s) equal 0, which GPTQ v1 (it stores zero-1) cannot encode; "
                              "export with --gptq-format gptq_v2 (GPTQModel) or quantize with sym: true")
        zeros = zeros - 1
    scales32 = r.scales.detach().float().cpu()
    scales = scales32.to(torch.float16)
    if not torch.isfinite(scales).all() or bool(((scales == 0) & (scales32 != 0)).any()):
        raise ExportError(f"{name}: a scale is outside float16's range (|s| {float(scales32.abs().max()):.3g} / "
                          f"{float(scales32.abs().min()):.3g}); GPTQ stores fp16 scales (export --format "
                          "compressed-tensors or epmq, which keep float32)")
    qweight = _stream_words(_codes(r), r.bits, name=f"{name}.codes", exact=True).t().contiguous()
    qzeros = _stream_words(zeros.t().contiguous(), r.bits, name=f"{name}.zeros", exact=True).contiguous()
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(),
            "g_idx": r.g_idx.detach().cpu().to(torch.int32).contiguous()}


def gptq_reference_weight(r: QuantResult) -> torch.Tensor:
    """What a GPTQ loader dequantizes our result to, in float32: ``fp16(scale) * (code - zero)`` (our weight
    with only the scales rounded to fp16; rounding that product to fp16 gives the fp16 kernels' weight)."""
    g = r.g_idx.long()
    s = r.scales.detach().float().cpu().to(torch.float16).float()
    return s[:, g] * (r.codes.detach().cpu().float() - r.zeros.detach().float().cpu()[:, g])


# ----------------------------------------------------------------------------------- compressed-tensors


def ct_tensors(name: str, r: QuantResult, *, symmetric: bool, scale_dtype: torch.dtype = torch.float32
               ) -> dict[str, torch.Tensor]:
    """One Linear's compressed-tensors ``pack-quantized`` tensors (module docstring) from our result."""
    rows, cols = r.weight.shape
    G = r.scales.shape[1]
    if r.group_size != -1 and cols % r.group_size:
        raise ExportError(f"{name}: {cols} input columns are not a multiple of group_size {r.group_size}; "
                          "compressed-tensors needs whole groups (export --format epmq or gptq)")
    ref = contiguous_g_idx(cols, r.group_size)
    if G != (1 if r.group_size == -1 else cols // r.group_size):
        raise ExportError(f"{name}: {G} groups do not match group_size {r.group_size} over {cols} columns")
    if not torch.equal(r.g_idx.detach().cpu().to(torch.int32), ref):
        raise ExportError(f"{name}: act-order groups (g_idx not contiguous) have no compressed-tensors encoding "
                          "(its actorder 'group' is deprecated); quantize with static_groups: true or export "
                          "--format gptq (desc_act) or epmq")
    zeros = _integer_zeros(name, r)
    offset = 2 ** (r.bits - 1)
    if symmetric and not bool((zeros == offset).all()):
        raise ExportError(f"{name}: symmetric export needs every zero point = {offset}")
    scale = r.scales.detach().float().cpu()
    out = {"weight_packed": _stream_words(_codes(r), r.bits, name=f"{name}.codes", exact=False),
           "weight_scale": scale.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not torch.isfinite(out["weight_scale"]).all():
        raise ExportError(f"{name}: a scale overflows {scale_dtype} (use --scale-dtype float32)")
    if not symmetric:
        out["weight_zero_point"] = _stream_words(zeros.t().contiguous(), r.bits, name=f"{name}.zeros",
                                                 exact=False).t().contiguous()
    return out


def ct_reference_weight(r: QuantResult, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What compressed-tensors decompresses our result to: ``(code - zero) * scale`` in ``scale_dtype``
    (float32: bit-identical to our fake-quant weight)."""
    g = r.g_idx.long()
    s = r.scales.detach().float().cpu().to(scale_dtype)
    diff = (r.codes.detach().cpu().float() - r.zeros.detach().float().cpu()[:, g]).to(scale_dtype)
    return diff * s[:, g]


# ---------------------------------------------------------------------------------------- model level


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        raise ExportError(f"{name}: module {owner_path!r} not found in the model") from None
    return owner_path, owner, leaf


def check_exportable(model: nn.Module, results: dict[str, QuantResult], fmt: str) -> None:
    """Raise :class:`ExportError` (one line naming the parameter and a layout that works) for what ``fmt``
    cannot express; ``epmq`` expresses everything :func:`epmq.quant.packed.save_quantized` does."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    if not results:
        raise ExportError("no quantized weights to export (a method without integer codes, e.g. epmq_unrounded)")
    if fmt == "epmq":
        return
    for name in results:
        _, owner, leaf = _owner(model, name)
        if leaf == "in_proj_weight" or isinstance(owner, nn.MultiheadAttention):
            raise ExportError(f"{name}: nn.MultiheadAttention's fused in_proj is no Linear, so {fmt} cannot express "
                              "it; use the HF CLIP layout (clip suite, layout: hf: separate q/k/v Linears) or --format "
                              "epmq")
        if not isinstance(owner, nn.Linear) or leaf != "weight":
            raise ExportError(f"{name}: only nn.Linear weights can be stored in {fmt} ({type(owner).__name__}."
                              f"{leaf}); use --format epmq")
    first = next(iter(results.values()))
    for name, r in results.items():
        if (r.bits, r.group_size, bool(r.sym)) != (first.bits, first.group_size, bool(first.sym)):
            raise ExportError(f"{name}: {r.bits} bits / group {r.group_size} / sym {r.sym} differs from the other "
                              f"layers' ({first.bits}, {first.group_size}, {first.sym}); {fmt}'s config holds one "
                              "scheme (use --format epmq)")


def _state_tensors(model: nn.Module, others: dict | None) -> dict[str, torch.Tensor]:
    """The model's tensors to store besides the quantized ones: ``others`` (e.g. a packed checkpoint's) or the
    model's state dict, tied copies dropped."""
    from epmq.models.sources import tied_aliases, unique_state_dict

    if others is None:
        sd = unique_state_dict(model)
    else:  # a packed checkpoint stores tied copies (T5's embed_tokens); loaders refill them from shared.weight
        drop = tied_aliases(model)
        sd = {k: v for k, v in others.items() if k not in drop}
    out, seen = {}, set()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"state_dict[{k!r}]: {type(v).__name__} cannot be stored in safetensors")
        t = v.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def quantized_tensors(model: nn.Module, results: dict[str, QuantResult], fmt: str, *, others: dict | None = None,
                      gptq_format: str = "gptq", scale_dtype: str = "float32") -> tuple[dict, dict]:
    """``(tensors, quantization_config)`` of ``model`` in ``fmt`` (``gptq`` / ``compressed-tensors``)."""
    check_exportable(model, results, fmt)
    if scale_dtype not in SCALE_DTYPES:
        raise ExportError(f"--scale-dtype {scale_dtype!r}: expected one of {list(SCALE_DTYPES)}")
    tensors = _state_tensors(model, others)
    first = next(iter(results.values()))
    model_keys = set(model.state_dict())
    symmetric = bool(first.sym)
    if fmt == "compressed-tensors" and symmetric:
        offset = 2 ** (first.bits - 1)
        symmetric = all(bool((r.zeros == offset).all()) for r in results.values())
    for name, r in results.items():
        owner_path, owner, _ = _owner(model, name)
        tensors.pop(name, None)
        if r.bias is not None:
            if owner.bias is None:
                raise ExportError(f"{name}: a refitted bias on a Linear without bias ({owner_path}) cannot be loaded "
                                  f"by {fmt} tools (quantize with fit_bias: false, or --format epmq)")
            tensors[f"{owner_path}.bias"] = r.bias.detach().cpu().to(owner.bias.dtype).contiguous()
        if fmt == "gptq":
            packed = gptq_tensors(name, r, checkpoint_format=gptq_format)
        else:
            packed = ct_tensors(name, r, symmetric=symmetric, scale_dtype=SCALE_DTYPES[scale_dtype])
        for k, t in packed.items():
            tensors[f"{owner_path}.{k}"] = t
    stray = sorted(k for k in tensors if k not in model_keys and not k.rpartition(".")[0] + ".weight" in results)
    if stray:
        raise ExportError(f"{stray[0]}: not a tensor of the model (a bias added to a bias-free Linear?); "
                          f"{fmt} tools would not load it (use --format epmq)")
    quantized_modules = {n.rpartition(".")[0] for n in results}
    if fmt == "gptq":
        needs_g_idx = any(not torch.equal(r.g_idx.detach().cpu().to(torch.int32),
                                          contiguous_g_idx(r.weight.shape[1], r.group_size))
                          for r in results.values())
        skipped = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized_modules)
        qcfg = {"quant_method": "gptq", "bits": first.bits, "group_size": first.group_size,
                "desc_act": needs_g_idx, "static_groups": not needs_g_idx and first.group_size != -1,
                "sym": bool(first.sym), "true_sequential": True, "damp_percent": None,
                "checkpoint_format": gptq_format, "modules_in_block_to_quantize": None,
                "epmq_unquantized_linears": skipped}
        if first.info.get("damp") is not None:
            qcfg["damp_percent"] = first.info["damp"]
    else:
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized_modules)
        weights = {"num_bits": first.bits, "type": "int", "symmetric": symmetric,
                   "strategy": "channel" if first.group_size == -1 else "group",
                   "group_size": None if first.group_size == -1 else first.group_size,
                   "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}
        qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "version": CT_VERSION, "config_groups": {"group_0": {
                    "targets": ["Linear"], "weights": weights, "input_activations": None,
                    "output_activations": None, "format": "pack-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "transform_config": {}}
    return tensors, qcfg


# -------------------------------------------------------------------------------------------- folder


def hf_config(model: nn.Module) -> dict | None:
    """The ``config.json`` dict of a transformers model (None for other modules)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = cfg.to_dict()
    d["architectures"] = [type(model).__name__]
    return d


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_model(model: nn.Module, results: dict[str, QuantResult], out, *, fmt: str, others: dict | None = None,
                 config: dict | None = None, assets: dict | None = None, card: str | None = None,
                 record: dict | None = None, gptq_format: str = "gptq", scale_dtype: str = "float32") -> dict:
    """Write the self-contained folder ``out`` (module docstring) and return its ``export.json`` record.

    ``model``: the quantized model's architecture (its quantized weights are ignored; the other tensors come
    from ``others`` when given, else from the model); ``results``: full parameter name -> :class:`QuantResult`;
    ``config``: the ``config.json`` dict (default :func:`hf_config`); ``assets``: ``{relative path: source
    file}`` to copy (processor, tokenizer, heads) or ``{relative path: dict}`` to write as JSON; ``card``: the
    README.md text. The folder is built beside ``out`` and renamed into place.
    """
    from safetensors.torch import save_file

    check_exportable(model, results, fmt)
    out = Path(out)
    config = hf_config(model) if config is None else dict(config)
    with atomic_path(out, folder=True) as tmp:  # built beside ``out``, renamed into place (an old one replaced)
        rec = {"format": fmt, **(record or {})}
        if fmt == "epmq":
            from epmq.quant.packed import save_quantized

            sd_model = model
            if others is not None:
                model.load_state_dict({k: v for k, v in others.items() if k in model.state_dict()}, strict=False)
            rep = save_quantized(sd_model, results, tmp, config=rec.get("quantize", {}))
            rec["packed"] = {k: rep[k] for k in ("quantized_code_bytes", "quantized_meta_bytes",
                                                  "quantized_fp16_bytes", "packed_ratio")}
            if config is not None:
                config = {**config, "epmq_quantization": {"format": "epmq-packed", "file": "quant_config.json",
                                                          "loader": "epmq.quant.packed.load_quantized"}}
        else:
            tensors, qcfg = quantized_tensors(model, results, fmt, others=others, gptq_format=gptq_format,
                                              scale_dtype=scale_dtype)
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            if config is None:
                config = {}
            config = {**config, "quantization_config": qcfg}
            if fmt == "gptq":
                (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
            rec["quantization_config"] = qcfg
        if config:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for rel, src in (assets or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, (dict, list)):
                dst.write_text(json.dumps(src, indent=2) + "\n")
            else:
                shutil.copyfile(src, dst)
        if card is not None:
            (tmp / "README.md").write_text(card)
        first = next(iter(results.values()))
        rec["bits"], rec["group_size"], rec["sym"] = first.bits, first.group_size, bool(first.sym)
        rec["n_quantized"] = len(results)
        rec["weights_bytes"] = (tmp / WEIGHTS_FILE).stat().st_size
        rec["folder_bytes_without_record"] = folder_bytes(tmp)
        rec["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [RECORD_FILE]
        (tmp / RECORD_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
    return rec


# ------------------------------------------------------------------------------- a leaderboard cell


#: processor / tokenizer files copied from a hub base folder when present (no code files: nothing is executed)
PROCESSOR_FILES = {"clip": ("preprocessor_config.json",),
                   "t5-glue": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                               "generation_config.json")}


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def suite_provenance(suite, suite_type: str) -> dict:
    """Base and experts of ``suite`` with the hub commits its artefacts recorded (None where not from a hub)."""
    base = _read_json(suite.base_path.with_suffix(".json"))
    cfg = getattr(suite, "cfg", {}) or {}
    experts = []
    for t in suite.tasks:
        meta = _read_json(suite.expert_path(t).with_suffix(".json"))
        src = suite.expert_source(t) if hasattr(suite, "expert_source") else f"fine-tuned by epmq ({suite_type})"
        experts.append({"task": t, "source": str(src), "revision": meta.get("revision")})
    return {"base": str(cfg.get("base") or f"pretrained by epmq ({suite_type})"), "base_revision": base.get("revision"),
            "experts": experts}


def suite_assets(suite, suite_type: str) -> tuple[dict, list[str]]:
    """``({relative path: source file or JSON}, notes)``: processor / tokenizer files of the base and the task
    heads (CLIP: zero-shot heads, the projection they apply and the class names; T5: none)."""
    assets, notes = {}, []
    names = PROCESSOR_FILES.get(suite_type, ())
    if names:
        try:
            base = _read_json(suite.base_path.with_suffix(".json"))
            folder = suite._resolve_model(suite.cfg["base"], revision=base.get("revision"))
            for n in names:
                if (Path(folder) / n).is_file():
                    assets[n] = Path(folder) / n
        except EPMQError as e:
            notes.append(f"processor / tokenizer not copied: {str(e).splitlines()[0]}")
    else:
        notes.append(f"the {suite_type} suite has no hub processor / tokenizer to ship")
    heads = {}
    for t in suite.tasks:
        p = suite.head_path(t)
        if p.is_file():
            assets[f"heads/{t}.safetensors"] = p
            heads[t] = True
    proj = getattr(suite, "projection_path", None)
    if heads and proj is not None and Path(proj).is_file():
        assets["heads/projection.safetensors"] = Path(proj)
    if heads and suite_type == "clip":
        from epmq.tasks.clip import get_task

        assets["heads/classes.json"] = {t: list(get_task(t).classnames) for t in heads}
    return assets, notes


def leaderboard_rows(results_dir, run) -> list[dict]:
    """This model's rows from the run records: test accuracy per task and Avg, mean ± std over every seed's
    record of the run ``run`` (an :class:`epmq.identity.QuantRun`: ``quant/<run without /s<seed>>/s*.json``),
    and the FP merged model's row."""
    import statistics

    rows = []
    groups = [("quantized (this model)", sorted(Path(run.eval_record(results_dir)).parent.glob("s*.json"))),
              ("FP merged", [Path(run.merged().eval_record(results_dir))])]
    for label, paths in groups:
        recs = [_read_json(p) for p in paths if p.is_file()]
        recs = [r for r in recs if r.get("tasks")]
        if not recs:
            continue
        tasks = list(recs[0]["tasks"])
        per = {t: [r["tasks"][t]["accuracy"] for r in recs if t in r["tasks"]] for t in tasks}
        avgs = [sum(r["tasks"][t]["accuracy"] for t in tasks) / len(tasks) for r in recs]

        def ms(v):
            return [statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0]

        rows.append({"model": label, "n_seeds": len(recs), "split": recs[0].get("split"),
                     "avg": ms(avgs), "tasks": {t: ms(v) for t, v in per.items()}})
    return rows


def model_card(meta: dict) -> str:
    """README.md: YAML front matter (hub metadata + an ``epmq`` block with the provenance) and a short body."""
    import yaml

    q = meta["quantizer"]
    fmt = meta["format"]
    front = {"base_model": meta["base"], "base_model_relation": "quantized", "tags": [
        "epmq", "model-merging", "post-merge-quantization", fmt, f"{q['bits']}-bit", meta["merge"]["method"]]}
    if meta.get("library_name"):
        front["library_name"] = meta["library_name"]
    front["epmq"] = {k: meta[k] for k in ("suite", "suite_type", "format", "experts", "base_revision", "merge",
                                          "quantizer", "calibration", "leaderboard", "epmq_version", "git_sha")}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {meta['suite']}: {meta['merge']['method']} merge, {q['method']} {q['bits']}-bit ({fmt})", "",
             f"Merged from {len(meta['experts'])} task experts of `{meta['base']}` with {meta['merge']['method']} "
             f"(hyperparameters chosen on validation: `{json.dumps(meta['merge']['params'], sort_keys=True)}`), then "
             f"quantized by epmq's `{q['method']}` to {q['bits']} bits (group size {q['group_size']}, "
             f"{'symmetric' if q.get('sym') else 'asymmetric'} grid, act-order {bool(q.get('act_order'))}) with "
             f"{meta['calibration']['n_per_task']} calibration examples per task (train split, seed "
             f"{meta['calibration']['seed']}).", ""]
    if meta["leaderboard"]:
        tasks = list(meta["leaderboard"][0]["tasks"])
        lines += ["| model | seeds | " + " | ".join(tasks) + " | Avg |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
        for r in meta["leaderboard"]:
            cells = [f"{r['tasks'][t][0]:.1f} ± {r['tasks'][t][1]:.1f}" if t in r["tasks"] else "" for t in tasks]
            lines.append(f"| {r['model']} | {r['n_seeds']} | " + " | ".join(cells)
                         + f" | {r['avg'][0]:.1f} ± {r['avg'][1]:.1f} |")
        lines += ["", f"Test accuracy (%) on each task's {meta['leaderboard'][0].get('split') or 'test'} split, "
                      "mean ± std over calibration seeds (std 0 with one seed).", ""]
    else:
        lines += ["No evaluation records of this model were found when it was exported.", ""]
    lines += ["## Experts", "", "| task | source | revision |", "|---|---|---|"]
    lines += [f"| {e['task']} | {e['source']} | {e['revision'] or '-'} |" for e in meta["experts"]]
    lines += ["", "## Loading", "", LOADING[fmt], ""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    lines += [f"Exported by epmq {meta['epmq_version']} (git {meta['git_sha'] or 'unknown'}). Upload: "
              "`huggingface-cli upload <user>/<repo> <this folder>`.", ""]
    return "\n".join(lines)


LOADING = {
    "gptq": "GPTQ checkpoint (`quantization_config` in config.json, `checkpoint_format` as stated there): "
            "GPTQModel, AutoGPTQ, transformers' GPTQ path and vLLM read `qweight` / `qzeros` / `scales` / `g_idx` "
            "per Linear. Scales are fp16 (the only difference to epmq's float32 fake-quant weights).",
    "compressed-tensors": "compressed-tensors `pack-quantized` (W-only int): `transformers` with the "
                          "`compressed-tensors` package (`AutoModel.from_pretrained(folder)`) and vLLM load it; "
                          "`compressed_tensors.compressors.PackedQuantizationCompressor.decompress` gives the "
                          "dense weights (bit-exact to epmq's fake-quant weights with float32 scales).",
    "epmq": "epmq's packed layout: `epmq.quant.packed.load_quantized(<architecture>, folder)` "
            "(`quant_config.json` describes the bit order).",
}


def export_cell(spec: dict, run, qcfg: dict, *, results_dir, calib, merged, out, fmt: str, n_calib: int,
                batch_size: int, device: str = "auto", packed_from=None, gptq_format: str = "gptq",
                scale_dtype: str = "float32") -> dict:
    """Quantize one leaderboard cell, ``run`` (an :class:`epmq.identity.QuantRun`), exactly as ``epmq quantize
    --packed`` does (:func:`epmq.pipeline.quantize` into a temp packed checkpoint; or read ``packed_from``), and
    write its folder with :func:`export_model`. Keyword-only: the files and options of the export (a reason for
    more than seven parameters: each is one CLI flag)."""
    from epmq import pipeline
    from epmq.quant.packed import read_packed

    suite = pipeline.open_suite(spec)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    with tempfile.TemporaryDirectory(prefix="epmq-export-") as tmp:
        if packed_from is None:
            packed_from = Path(tmp) / "packed"
            files = pipeline.QuantizeFiles(merged=merged, calib=calib, out=Path(tmp) / "q.safetensors",
                                           packed=packed_from)
            rec = pipeline.quantize(spec, run, qcfg, files,
                                    pipeline.QuantizeOptions(n_calib=n_calib, device=device, save_weights=False))
            quant = {"method": rec["method"], "bits": rec["bits"], "group_size": rec["group_size"],
                     **rec["quant_params"], "seed": rec["seed"]}
            merge_rec = {"id": run.merge, "method": None, "params": rec["merge_params"]}
        else:
            pc = _read_json(Path(packed_from) / "quant_config.json").get("config", {})
            quant = {k: pc.get(k) for k in ("method", "bits", "group_size", "seed")}
            merge_rec = {"id": pc.get("merge", run.merge), "method": None, "params": pc.get("merge_params", {})}
        _, results, others = read_packed(packed_from)
        model = suite.new_encoder()
        mrec = _read_json(Path(merged).with_suffix(".json"))
        merge_rec["method"] = mrec.get("method", run.merge)
        prov = suite_provenance(suite, spec["type"])
        assets, notes = suite_assets(suite, spec["type"])
        meta = {"suite": run.suite, "suite_type": spec["type"], "format": fmt, **prov, "merge": merge_rec,
                "quantizer": quant, "calibration": {"n_per_task": n_calib, "seed": run.seed,
                                                    "batch_size": batch_size, "split": "train"},
                "leaderboard": leaderboard_rows(results_dir, run),
                "library_name": "transformers" if hf_config(model) is not None else None, "notes": notes}
        meta.update({k: pipeline.provenance()[k2] for k, k2 in (("epmq_version", "epmq"), ("git_sha", "git_sha"))})
        config = hf_config(model)
        if config is None:  # open_clip / in-house BERT: no transformers config; describe the architecture instead
            base = _read_json(suite.base_path.with_suffix(".json"))
            assets["epmq_architecture.json"] = {"suite_type": spec["type"], "adapter": getattr(suite, "adapter", None),
                                                "options": spec["options"],
                                                **{k: base[k] for k in ("openclip_config", "vision_config")
                                                   if k in base}}
        return export_model(model, results, out, fmt=fmt, others=others, config=config, assets=assets,
                            card=model_card(meta), record={"cell": meta, "quantize": quant},
                            gptq_format=gptq_format, scale_dtype=scale_dtype)
