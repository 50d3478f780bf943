"""Benchmark: calibrate + quantize an open_clip vision tower with GPTQ, E-PMQ and a reference-style GPTQ loop.

Not a test. Builds open_clip's vision tower (``--arch``, random seeded weights), T "experts" (the base plus
seeded per-tensor perturbations of relative size ``--pert``), the task-arithmetic merge of them
(``base + lam * sum_t (expert_t - base)``, ``lam = 1/T``: their mean) and random calibration images, then
times side by side:

``gptq``       :func:`epmq.engine.quantize_model`, method ``gptq``, sequential propagation;
``epmq``       the same with method ``epmq`` and the experts;
``reference``  the straightforward procedure of the original GPTQ code (IST-DASLab ``opt.py``/``llama.py``
               ``--true-sequential``): per block and per true-sequential group, forward hooks on the merged
               model accumulate ``H = 2/n X X^T`` over every calibration batch, the plain per-column
               :func:`epmq.quant.rounding.gptq` (``engine="plain"``) rounds each weight, then the block is
               re-run to propagate. It is the ratio baseline.

A second table isolates the rounding: for each distinct Linear shape of the architecture, ``gptq`` with the
plain per-column loop and with the fast engine (:mod:`epmq.quant.kernels`) on the same weight and Hessian,
in the same process, with the codes compared (``<csv stem>-layers.csv``).

Each variant runs in its own subprocess of this script (``--only VARIANT``) so that the peak RSS
(``getrusage`` high-water mark, process-wide) is that variant's alone; the model build is inside that
process too, so the RSS includes the model, the experts and the calibration images.

    python bench/quantize_bench.py --device cuda --arch ViT-B-32 --tasks 8 --n-per-task 256
    python bench/quantize_bench.py --small            # CPU, ~1 min on 2 cores; ratios only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._table import text_table, write_csv as _write_csv  # noqa: E402

VARIANTS = ("reference", "gptq", "epmq")

#: what ``quantize_model(method="gptq")`` is, relative to the reference loop (written into every row)
ENGINE_NOTE = (
    "gptq/epmq round with the fast engine (one kernel call per block segment, kernel column); the reference "
    "with the plain per-column loop"
)

CSV_COLUMNS = [
    "variant", "seconds", "speedup_vs_reference", "ratio_vs_gptq", "peak_rss_mb", "peak_gpu_mb", "n_layers",
    "mean_rel_err", "rel_err_diff_vs_reference", "device", "device_name", "torch_version", "python_version",
    "threads", "arch", "blocks", "width", "tasks", "n_per_task", "batch_size", "image_size", "bits", "group_size",
    "damp", "block_size", "pert", "lam", "seed", "small", "isolated", "experts_streamed", "expert_cache_mb",
    "reuse_cache_mb", "kernel", "engine_note",
]

LAYER_COLUMNS = [
    "layer", "d_out", "d_in", "per_model", "plain_seconds", "fast_seconds", "speedup", "codes_identical",
    "max_abs_diff", "kernel", "device", "device_name", "threads", "arch", "bits", "group_size", "block_size",
]


# ------------------------------------------------------------------ setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_visual(arch: str, image_size: int, blocks: int | None, width: int | None = None) -> nn.Module:
    from epmq.models.sources import build_openclip_visual, openclip_model_config

    cfg = copy.deepcopy(openclip_model_config(arch))
    cfg["vision_cfg"]["image_size"] = image_size
    if width:  # smoke tests only: not the architecture any more
        cfg["vision_cfg"]["width"] = width
    model = build_openclip_visual(cfg)
    if blocks:
        rb = model.transformer.resblocks
        if not 1 <= blocks <= len(rb):
            raise SystemExit(f"--blocks {blocks}: {arch} has {len(rb)} blocks")
        model.transformer.resblocks = nn.ModuleList(list(rb)[:blocks])
        model.transformer.layers = blocks
    return model.eval()


def _base(args) -> nn.Module:
    torch.manual_seed(args.seed)
    return build_visual(args.arch, args.image_size, args.blocks, args.width)


def _experts(base_sd: dict, args):
    """Yield the T expert state dicts one at a time (one generator in order: the same numbers whether they are
    kept in memory or written to ``--experts-dir``)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.tasks):
        sd = {}
        for k, v in base_sd.items():
            if v.is_floating_point() and v.numel() > 1:
                rms = v.float().pow(2).mean().sqrt().clamp_min(1e-8)
                sd[k] = v + args.pert * rms * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            else:
                sd[k] = v.clone()
        yield sd


def _experts_meta(args) -> dict:
    keys = ("arch", "image_size", "blocks", "width", "tasks", "pert", "seed")
    return {k: str(getattr(args, k)) for k in keys}


def expert_paths(args) -> list[Path]:
    return [Path(args.experts_dir) / f"expert{t:02d}.safetensors" for t in range(args.tasks)]


def write_experts(args) -> list[Path]:
    """``--experts-dir``: write the T experts as safetensors (one in memory at a time), unless files written
    with the same settings are there already. Runs in the parent process, so no variant's RSS pays for it."""
    from safetensors.torch import save_file

    from epmq.io import atomic_path
    from epmq.merge.driver import lazy_state_dict

    paths, meta = expert_paths(args), _experts_meta(args)

    def current(path):
        return path.is_file() and lazy_state_dict(path).metadata() == meta

    if all(current(p) for p in paths):
        return paths
    Path(args.experts_dir).mkdir(parents=True, exist_ok=True)
    base_sd = {k: v.detach().clone() for k, v in _base(args).state_dict().items()}
    for path, sd in zip(paths, _experts(base_sd, args)):
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
        del sd
    return paths


def setup(args) -> tuple[nn.Module, list, list[list[torch.Tensor]]]:
    """(merged model, experts, per-task calibration batches), all on the CPU, deterministic.

    In memory, the experts are state dicts. With ``--experts-dir`` they are lazy safetensors state dicts (the
    files :func:`write_experts` made) and the merge is streamed tensor by tensor into the model's own
    parameters, so the process never holds more than the model plus one tensor per expert: the peak RSS is
    then the streamed engine's. Both give the same merged weights."""
    merged = _base(args)
    if args.experts_dir:
        from epmq.merge.driver import lazy_state_dict

        experts = [lazy_state_dict(p) for p in expert_paths(args)]
    else:
        experts = list(_experts({k: v.detach().clone() for k, v in merged.state_dict().items()}, args))
    lam = 1.0 / args.tasks
    with torch.no_grad():
        for k, v in merged.state_dict().items():  # views of the parameters: the base becomes the merge in place
            if v.is_floating_point():
                v.add_(lam * sum(e[k] - v for e in experts))
    calib = []
    for t in range(args.tasks):
        g = torch.Generator().manual_seed(args.seed + 1000 + t)
        imgs = torch.randn(args.n_per_task, 3, args.image_size, args.image_size, generator=g)
        calib.append(list(imgs.split(args.batch_size)))
    return merged, experts, calib


# ------------------------------------------------------------------ the reference-style loop


@torch.no_grad()
def reference_gptq(model: nn.Module, calib, args, device) -> list[dict]:
    """The original GPTQ procedure (true-sequential), written out plainly; returns a log row per layer."""
    from epmq.engine import Capture, capture_block_inputs, link_mha_parents, run_block
    from epmq.models.adapters import get_adapter
    from epmq.quant.result import layer_error
    from epmq.quant.rounding import gptq

    adapter = get_adapter(model)
    model = model.to(device)
    blocks = adapter.find_blocks(model)
    first = blocks[0][1]
    inps = [c for batches in calib for c in capture_block_inputs(model, first, adapter, batches, device)]
    layers = []
    for prefix, block in blocks:
        link_mha_parents(block)
        for group in adapter.find_linears(block):
            keys = {}
            for s in group:
                keys.setdefault(s.input_key, s)
            H = {k: torch.zeros(s.weight.shape[1], s.weight.shape[1], device=device) for k, s in keys.items()}
            n = dict.fromkeys(keys, 0)
            for call in inps:
                with Capture(list(keys.values())) as cap:  # full block forward, as in the reference
                    run_block(block, call)
                for k in keys:  # the reference's add_batch: running mean of 2 X X^T
                    x = cap.inputs[k].reshape(-1, H[k].shape[0]).t().float()
                    m = x.shape[1]
                    H[k] *= n[k] / (n[k] + m)
                    n[k] += m
                    x = (2 / n[k]) ** 0.5 * x
                    H[k] += x @ x.t()
            for s in group:
                W = s.weight.detach().float().clone()  # .float() of a float32 weight is the weight itself
                Hk = H[s.input_key]
                t0 = time.perf_counter()
                res = gptq(W, Hk, args.bits, group_size=args.group_size, damp=args.damp, block_size=args.block_size,
                           engine="plain")
                s.weight.data.copy_(res.weight.to(s.weight.dtype))
                # the same float32 diagnostic as quantize_model's layer log (so both pay the same for it)
                err = layer_error(res.weight - W, Hk, float32=True) / max(layer_error(W, Hk, float32=True), 1e-30)
                layers.append({"layer": prefix + s.name, "seconds": time.perf_counter() - t0, "rel_err_merged": err})
            del H
        inps = [c.with_hidden(run_block(block, c)) for c in inps]
    return layers


# ------------------------------------------------------------------ one variant


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run_variant(variant: str, args) -> dict:
    """Build the setup, then time ``variant`` (calibration forward passes + quantization)."""
    budgets = {"EPMQ_EXPERT_CACHE_MB": args.expert_cache_mb, "EPMQ_REUSE_CACHE_MB": args.reuse_cache_mb}
    before = {k: os.environ.get(k) for k in budgets}
    try:
        for k, v in budgets.items():
            if v is not None:
                os.environ[k] = str(v)
        return _run_variant(variant, args)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_variant(variant: str, args) -> dict:
    from epmq.engine import QuantConfig, quantize_model

    device = resolve_device(args.device)
    merged, experts, calib = setup(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    if variant == "reference":
        layers = reference_gptq(merged, calib, args, device)
    else:
        cfg = QuantConfig(method=variant, bits=args.bits, group_size=args.group_size, damp=args.damp,
                          block_size=args.block_size, propagation="sequential")
        report = quantize_model(merged, calib, cfg, experts=experts if variant == "epmq" else None,
                                device=device, progress=False)
        layers = [{"layer": r["layer"], "rel_err_merged": r["rel_err_merged"]} for r in report.layers]
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"),
        "layers": {r["layer"]: r["rel_err_merged"] for r in layers},
        "width": merged.transformer.width,
        "n_blocks": len(merged.transformer.resblocks),
    }


def _argv_for(args) -> list[str]:
    out = []
    for k, v in vars(args).items():
        if k in ("only", "json_out", "out", "no_isolate", "small", "no_layers", "variants") or v is None:
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _engine_budget(name: str, given: int | None) -> int:
    from epmq.engine import cache_budget_mb

    return cache_budget_mb(name) if given is None else given


def run_isolated(variant: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", variant, "--json-out", str(path),
               *_argv_for(args)]
        subprocess.run(cmd, check=True)
        return json.loads(path.read_text())


# ------------------------------------------------------------------ all variants, table, CSV


def bench(args) -> list[dict]:
    """Run every variant (each in a subprocess unless ``args.no_isolate``); returns the CSV rows."""
    device = resolve_device(args.device)
    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if args.experts_dir:
        t0 = time.perf_counter()
        write_experts(args)
        print(f"experts in {args.experts_dir} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    try:
        for v in args.variants:
            results[v] = run_variant(v, args) if args.no_isolate else run_isolated(v, args)
    finally:
        torch.set_num_threads(prev_threads)
    nan = {"seconds": float("nan"), "layers": {}}
    ref, gq = results.get("reference", nan), results.get("gptq", nan)
    first = next(iter(results.values()))
    meta = {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": args.threads or prev_threads,
        "arch": args.arch,
        "blocks": first["n_blocks"],
        "width": first["width"],
        "tasks": args.tasks,
        "n_per_task": args.n_per_task,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "bits": args.bits,
        "group_size": args.group_size,
        "damp": args.damp,
        "block_size": args.block_size,
        "pert": args.pert,
        "lam": 1.0 / args.tasks,
        "seed": args.seed,
        "small": bool(args.small),
        "isolated": not args.no_isolate,
        "expert_cache_mb": _engine_budget("EXPERT_CACHE_MB", args.expert_cache_mb),
        "reuse_cache_mb": _engine_budget("REUSE_CACHE_MB", args.reuse_cache_mb),
        "experts_streamed": bool(args.experts_dir),
        "kernel": kernel_name(device),
        "engine_note": ENGINE_NOTE,
    }
    rows = []
    for v in args.variants:
        r = results[v]
        errs = r["layers"]
        common = [k for k in errs if k in ref["layers"]]
        diff = (sum(abs(errs[k] - ref["layers"][k]) / max(ref["layers"][k], 1e-30) for k in common) / len(common)
                if common else float("nan"))
        rows.append({
            "variant": v,
            "seconds": r["seconds"],
            "speedup_vs_reference": ref["seconds"] / r["seconds"],
            "ratio_vs_gptq": r["seconds"] / gq["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
            "peak_gpu_mb": r["peak_gpu_mb"],
            "n_layers": len(errs),
            "mean_rel_err": sum(errs.values()) / max(len(errs), 1),
            "rel_err_diff_vs_reference": diff,
            **meta,
        })
    return rows


def kernel_name(device: torch.device) -> str:
    from epmq.quant import kernels

    return kernels.pick(device)


# ------------------------------------------------------------------ rounding alone, per layer shape


def layer_shapes(arch: str, image_size: int, width: int = 0) -> list[tuple[str, int, int, int]]:
    """(name, d_out, d_in, count in the whole model) for each distinct quantized Linear shape of ``arch``."""
    model = build_visual(arch, image_size, None, width)
    from epmq.models.adapters import get_adapter

    adapter = get_adapter(model)
    seen: dict[tuple[str, int, int], int] = {}
    for _, block in adapter.find_blocks(model):
        for group in adapter.find_linears(block):
            for s in group:
                key = (s.name, *s.weight.shape)
                seen[key] = seen.get(key, 0) + 1
    return [(n, o, i, c) for (n, o, i), c in seen.items()]


@torch.no_grad()
def bench_layers(args) -> list[dict]:
    """Time gptq(engine="plain") and gptq(engine="fast") on each distinct Linear shape, same W and H."""
    from epmq.quant.rounding import gptq

    device = resolve_device(args.device)
    rows = []
    kw = dict(group_size=args.group_size, damp=args.damp, block_size=args.block_size)
    for name, d_out, d_in, count in layer_shapes(args.arch, args.image_size, args.width):
        g = torch.Generator().manual_seed(args.seed)
        W = torch.randn(d_out, d_in, generator=g).to(device) * d_in**-0.5
        X = torch.randn(min(4 * d_in, 4096), d_in, generator=g).to(device)
        H = X.T @ X
        gptq(W[:8], H, args.bits, engine="fast", **kw)  # compile / load the kernel outside the timing
        times, res = {}, {}
        for eng in ("plain", "fast"):
            _sync(device)
            t0 = time.perf_counter()
            res[eng] = gptq(W, H, args.bits, engine=eng, **kw)
            _sync(device)
            times[eng] = time.perf_counter() - t0
        rows.append({
            "layer": name, "d_out": d_out, "d_in": d_in, "per_model": count,
            "plain_seconds": times["plain"], "fast_seconds": times["fast"], "speedup": times["plain"] / times["fast"],
            "codes_identical": float((res["plain"].codes == res["fast"].codes).float().mean()),
            "max_abs_diff": float((res["plain"].weight - res["fast"].weight).abs().max()),
            "kernel": kernel_name(device), "device": device.type, "device_name": device_name(device),
            "threads": torch.get_num_threads(), "arch": args.arch, "bits": args.bits,
            "group_size": args.group_size, "block_size": args.block_size,
        })
    tot = {e: sum(r[f"{e}_seconds"] * r["per_model"] for r in rows) for e in ("plain", "fast")}
    rows.append({**rows[-1], "layer": "whole model (sum x count)", "d_out": "", "d_in": "",
                 "per_model": sum(r["per_model"] for r in rows), "plain_seconds": tot["plain"],
                 "fast_seconds": tot["fast"], "speedup": tot["plain"] / tot["fast"],
                 "codes_identical": min(r["codes_identical"] for r in rows),
                 "max_abs_diff": max(r["max_abs_diff"] for r in rows)})
    return rows


def format_layers(rows: list[dict]) -> str:
    cols = [("layer", "{}"), ("d_out", "{}"), ("d_in", "{}"), ("per_model", "{}"), ("plain_seconds", "{:.3f}"),
            ("fast_seconds", "{:.3f}"), ("speedup", "{:.1f}x"), ("codes_identical", "{:.6f}"),
            ("max_abs_diff", "{:.2g}")]
    return "\n".join([f"rounding alone, per layer shape (kernel: {rows[0]['kernel']})", *text_table(rows, cols)])


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    _write_csv(rows, path, columns or CSV_COLUMNS)


def format_table(rows: list[dict]) -> str:
    m = rows[0]
    head = (f"{m['arch']} blocks={m['blocks']} T={m['tasks']} N={m['n_per_task']} bs={m['batch_size']} "
            f"{m['image_size']}px bits={m['bits']} g={m['group_size']} | {m['device']}: {m['device_name']} | "
            f"torch {m['torch_version']} threads={m['threads']}"
            + (" | experts streamed from safetensors" if m.get("experts_streamed") else ""))
    cols = [("variant", "{}"), ("seconds", "{:.2f}"), ("speedup_vs_reference", "{:.2f}x"),
            ("ratio_vs_gptq", "{:.2f}x"), ("peak_rss_mb", "{:.0f}"), ("peak_gpu_mb", "{:.0f}"),
            ("mean_rel_err", "{:.4g}"), ("rel_err_diff_vs_reference", "{:.3g}")]
    return "\n".join([head, *text_table(rows, cols), f"note: {m['engine_note']}"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (ViT-B-32, ViT-L-14, ...)")
    p.add_argument("--tasks", type=int, default=None, help="experts / calibration tasks T (default 8; small: 2)")
    p.add_argument("--n-per-task", type=int, default=None, help="calibration images per task (default 256; small: 8)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size (default 64; small: 8)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--blocks", type=int, default=None, help="keep only the first K resblocks (default all; small: 2)")
    p.add_argument("--width", type=int, default=0, help="override the tower's width (smoke tests only; 0: the arch's)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block width")
    p.add_argument("--pert", type=float, default=1e-2, help="expert perturbation, relative to each tensor's RMS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (0: torch's default; default 1 on CPU -- on a shared/contended CPU the "
                        "per-column GPTQ loop is >10x slower with 2 threads -- and 0 on CUDA)")
    p.add_argument("--small", action="store_true", help="CPU smoke size (T=2, N=8, 2 blocks); timings for ratios only")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/<device>-<arch>[-small].csv)")
    p.add_argument("--no-isolate", action="store_true", help="run the variants in this process (RSS not per variant)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer-shape rounding table")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (ratios to a missing one are NaN)")
    p.add_argument("--experts-dir", default=None,
                   help="write the experts there as safetensors (reused when current) and stream them: the "
                        "engine reads one block at a time, the merge one tensor at a time (peak-RSS runs)")
    p.add_argument("--expert-cache-mb", type=int, default=None,
                   help="budget of one block's captured expert inputs (sets EPMQ_EXPERT_CACHE_MB; default: the "
                        "engine's). Over it, each group re-runs the expert blocks: less memory, more time")
    p.add_argument("--reuse-cache-mb", type=int, default=None,
                   help="budget of the sub-module outputs a block keeps for its later passes "
                        "(sets EPMQ_REUSE_CACHE_MB; default: the engine's; 0: recompute everything)")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants {','.join(args.variants)!r}: expected a subset of {','.join(VARIANTS)}")
    small = {"tasks": 2, "n_per_task": 8, "batch_size": 8, "blocks": 2}
    full = {"tasks": 8, "n_per_task": 256, "batch_size": 64, "blocks": 0}
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.small and args.device == "auto":
        args.device = "cpu"
    if args.threads is None:
        args.threads = 1 if resolve_device(args.device).type == "cpu" else 0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        from epmq.io import write_text_atomic

        r = run_variant(args.only, args)
        write_text_atomic(args.json_out, json.dumps(r))
        return
    rows = bench(args)
    dev = rows[0]["device"]
    suffix = "-small" if args.small else ""
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{dev}-{args.arch}{suffix}.csv"
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out}")
    if not args.no_layers:
        lrows = bench_layers(args)
        lout = out.with_name(out.stem + "-layers.csv")
        write_csv(lrows, lout, LAYER_COLUMNS)
        print(format_layers(lrows))
        print(f"wrote {lout}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
