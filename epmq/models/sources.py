"""Where models come from: hub ids or local folders, safe state-dict loading, and the HF CLIP / open_clip /
FLAN-T5 loaders the online settings use (see ``design/DATA.md``, "Online").

* :func:`resolve` turns a local folder or a hub id (``openai/clip-vit-base-patch32``) into a folder, through
  the Hugging Face cache, at a pinned ``revision`` (a commit, or a branch / tag); :func:`missing` lists the
  sources that are not available offline, all at once. :func:`snapshot_revision` reads the commit a cache
  snapshot holds, :func:`check_revision` validates a pin, :func:`hub_commit` asks the hub (online) which
  commit a branch or tag is at.
* :func:`load_state_dict` reads safetensors (single file, folder, sharded index) and ``.pt/.bin/.pth`` only
  through ``torch.load(weights_only=True)``: no checkpoint ever runs pickled code.
* :func:`clip_vision_keys` maps the state dict of a ``CLIPVisionModel`` (either transformers layout) or a
  full ``CLIPModel`` to one canonical layout, :data:`CLIP_VISION_LAYOUT`: the flat keys of the
  transformers >= 5 ``CLIPVisionModel`` (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.*``,
  ``post_layernorm.*``); :func:`load_clip_vision` builds the model and loads them strictly.
* :func:`openclip_visual_keys` / :func:`load_openclip_visual` do the same for open_clip's
  ``VisionTransformer``; :func:`load_t5` / :func:`t5_linear_names` for ``T5ForConditionalGeneration``
  (:func:`build_t5` / :func:`load_t5_weights`: the same from a config dict and a state dict).
* :func:`unique_state_dict` drops the keys of tied weights (T5's ``embed_tokens`` = ``shared``), which
  safetensors cannot store twice; :func:`tied_aliases` names them.
* :func:`check_expert` checks that an expert's state dict matches its base key for key and shape.

torch, transformers and huggingface_hub are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from epmq.errors import EPMQError
from epmq.io import load_safetensors as _load_safetensors

# --------------------------------------------------------------------------------------------- resolving

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",  # sentencepiece (T5's spiece.model)
    "tokenizer*",
    "vocab*",
    "merges*",
)
BIN_PATTERNS = ("*.bin",)
CODE_IGNORED = ("*.py", "*.pyc")  # never fetched, whatever the patterns
ALWAYS_IGNORED = CODE_IGNORED + ("*.h5", "*.msgpack", "*.onnx", "*.ckpt")
BIN_IGNORED = ("training_args.bin", "optimizer*", "scheduler*", "rng_state*")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


#: a hub revision pinned to one commit: its full 40-hex SHA-1 (what ``snapshots/<commit>`` folders are named)
COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: any revision the hub takes: a commit, a branch or a tag (``main``, ``v1.0``, ``refs/pr/3``)
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def is_commit(revision) -> bool:
    """Whether ``revision`` pins one commit (a full 40-hex SHA), not a branch or tag that can move."""
    return isinstance(revision, str) and bool(COMMIT.match(revision))


def check_revision(revision, who: str) -> str:
    """``revision`` if it is a commit SHA or a branch / tag name, else :class:`EPMQError` naming ``who``."""
    if not isinstance(revision, str) or not REVISION.match(revision) or ".." in revision:
        raise EPMQError(f"{who}: revision {revision!r}: expected a 40-hex commit SHA or a branch / tag name")
    return revision


def snapshot_revision(folder) -> str | None:
    """The commit of an HF-cache snapshot folder (``.../snapshots/<commit>``); None for any other folder."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def is_hub_id(source: str) -> bool:
    """Whether ``source`` has the form of a hub model id ``owner/name`` (it may still be absent)."""
    return bool(HUB_ID.match(str(source))) and not str(source).startswith(".")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 -- no huggingface_hub: the download itself reports it
        return False


def _fetch_hint(hub_id: str, revision=None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"fetch it on a machine with internet (`hf download {hub_id}{rev}`, formerly `huggingface-cli download`, "
        "or run the workflow's download rule there) and copy the HF cache over, or pass a local folder instead"
    )


def _weights_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in WEIGHT_SUFFIXES and not any(fnmatch.fnmatch(p.name, pat) for pat in BIN_IGNORED)
    )


def _complete(folder: Path) -> str | None:
    """Why a model folder is unusable (``None`` when it has ``config.json``, weights and every indexed shard)."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    if not _weights_in(folder):
        return "no *.safetensors or *.bin weights"
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except Exception:  # noqa: BLE001 -- any unreadable index is reported the same way
            return f"unreadable shard index {index.name}"
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            return f"shard(s) {', '.join(absent[:3])} listed in {index.name} are absent"
    return None


def _snapshot(hub_id, *, allow_patterns, ignore_patterns, revision, cache_dir, local_only) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            hub_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(allow_patterns),
            ignore_patterns=list(ignore_patterns),
            local_files_only=local_only,
        )
    except Exception as e:  # not found, gated, offline, network: all end in the same advice
        why = (str(e).strip().splitlines() or [""])[0][:200]
        where = "not in the local HF cache (offline)" if local_only else "could not be downloaded"
        at = f" at revision '{revision}'" if revision else ""
        raise EPMQError(
            f"hub model '{hub_id}'{at} {where} ({type(e).__name__}: {why}); {_fetch_hint(hub_id, revision)}"
        ) from e
    path = Path(path)
    got = snapshot_revision(path)
    if is_commit(revision) and got != revision:  # a pin is never silently replaced by another snapshot
        raise EPMQError(
            f"hub model '{hub_id}' is pinned to revision {revision} but the HF cache gave snapshot "
            f"{got or path} (another revision); {_fetch_hint(hub_id, revision)}"
        )
    return path


def resolve(source, *, allow_patterns=None, revision=None, cache_dir=None, local_files_only=None) -> Path:
    """A local folder/file (returned as is) or the HF-cache snapshot folder of hub id ``source``.

    Hub ids go through ``huggingface_hub.snapshot_download`` (cached, resumable) at ``revision`` (None: the
    default branch), fetching :data:`DEFAULT_PATTERNS` (configs, safetensors, tokenizer files) and ``*.bin`` only
    when the repository has no safetensors; ``.py`` files never. Offline (``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True``) only the cache is consulted. Anything missing raises :class:`EPMQError` naming the
    id and how to fetch it; so does a snapshot whose commit is not the pinned one (``revision`` a commit SHA).
    The commit a snapshot holds is :func:`snapshot_revision` of the returned folder.
    """
    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        return local
    if not is_hub_id(source):
        raise EPMQError(f"model source '{source}' is neither an existing path nor a hub id of the form owner/name")
    if revision is not None:
        check_revision(revision, f"hub model '{source}'")
    local_only = _offline() if local_files_only is None else bool(local_files_only)
    kw = {"revision": revision, "cache_dir": cache_dir, "local_only": local_only}
    if allow_patterns is not None:
        return _snapshot(source, allow_patterns=allow_patterns, ignore_patterns=CODE_IGNORED, **kw)
    path = _snapshot(source, allow_patterns=DEFAULT_PATTERNS, ignore_patterns=ALWAYS_IGNORED, **kw)
    if not any(path.glob("*.safetensors")):
        path = _snapshot(source, allow_patterns=BIN_PATTERNS, ignore_patterns=ALWAYS_IGNORED + BIN_IGNORED, **kw)
    why = _complete(path)
    if why:
        raise EPMQError(f"hub model '{source}' is incomplete at {path} ({why}); {_fetch_hint(source)}")
    return path


def missing(sources, *, revision=None, cache_dir=None) -> list[str]:
    """The sources (in order, without repeats) that are neither existing local paths nor complete in the HF cache
    (at their revision: ``revision`` is one for all, or a mapping source -> revision; absent = default branch).

    Never touches the network, so a workflow can fail fast listing everything that still has to be fetched.
    """
    out = []
    for source in dict.fromkeys(str(s) for s in sources):
        rev = revision.get(source) if isinstance(revision, Mapping) else revision
        try:
            resolve(source, revision=rev, cache_dir=cache_dir, local_files_only=True)
        except EPMQError:
            out.append(source)
    return out


def hub_commit(repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
    """The commit SHA that ``revision`` (a branch, tag or commit) of hub repository ``repo_id`` is at now
    (``repo_type`` ``model`` or ``dataset``). Needs the network; any failure is one :class:`EPMQError` line."""
    from huggingface_hub import HfApi

    if repo_type not in ("model", "dataset"):
        raise EPMQError(f"hub_commit: repo_type={repo_type!r}: expected 'model' or 'dataset'")
    check_revision(revision, f"hub {repo_type} '{repo_id}'")
    api = HfApi()
    try:
        info = (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001 -- offline, not found, gated, network: one message
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise EPMQError(f"hub {repo_type} '{repo_id}' at revision '{revision}': cannot ask the hub for its commit "
                        f"({type(e).__name__}: {why}); this needs internet") from e
    sha = getattr(info, "sha", None)
    if not is_commit(sha):
        raise EPMQError(f"hub {repo_type} '{repo_id}' at revision '{revision}': the hub returned no commit ({sha!r})")
    return sha


# --------------------------------------------------------------------------------------------- state dicts

STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")


def _load_torch(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # classified below
        bad = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if bad:
            raise EPMQError(
                f"{path}: refusing to unpickle '{bad.group(1)}' (a full pickle can run code); convert it once, in a "
                "trusted environment, to safetensors (torch.load(weights_only=False) -> state_dict() -> "
                "safetensors.torch.save_file)"
            ) from e
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EPMQError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {first}) -- corrupt?") from e
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise EPMQError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise EPMQError(f"{path}: entry '{k}' is a {type(v).__name__}, not a tensor")
    return dict(obj)


def _load_file(path: Path) -> dict:
    if path.name.endswith(".index.json"):
        return _load_index(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".pt", ".bin", ".pth"):
        return _load_torch(path)
    raise EPMQError(f"{path}: unknown weights format (expected .safetensors, .pt, .bin, .pth or a *.index.json)")


def _merge(parts: list[tuple[Path, dict]]) -> dict:
    out: dict = {}
    for path, sd in parts:
        for k, v in sd.items():
            if k in out:
                raise EPMQError(f"{path}: key '{k}' also appears in another weights file of the same folder")
            out[k] = v
    return out


def _load_index(index: Path) -> dict:
    try:
        shards = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    except Exception as e:
        raise EPMQError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from e
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise EPMQError(f"{index}: shard '{shard}' is missing from {index.parent}")
    return _merge([(index.parent / s, _load_file(index.parent / s)) for s in shards])


def load_state_dict(path) -> dict:
    """All tensors of a weights file or model folder, on CPU.

    Folders: ``model.safetensors``, else ``model.safetensors.index.json`` (shards), else every ``*.safetensors``,
    then the same for ``pytorch_model.bin``, then any ``.bin/.pt/.pth``. ``.pt/.bin/.pth`` are read with
    ``torch.load(weights_only=True)``; a file that needs a full pickle, a corrupt file or a missing shard raises
    :class:`EPMQError` naming the file.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return _load_file(path)
    if not path.is_dir():
        raise EPMQError(f"weights path {path} does not exist")
    for single, index, pattern in (
        ("model.safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", None),
    ):
        if (path / single).is_file():
            return _load_file(path / single)
        if (path / index).is_file():
            return _load_index(path / index)
        files = sorted(path.glob(pattern)) if pattern else []
        if files:
            return _merge([(f, _load_file(f)) for f in files])
    files = [f for f in _weights_in(path) if f.suffix != ".safetensors"]
    if not files:
        raise EPMQError(f"{path}: no weights file (*.safetensors, *.bin, *.pt, *.pth) in this folder")
    return _merge([(f, _load_file(f)) for f in files])


def _state_dict(weights) -> dict:
    return dict(weights) if isinstance(weights, Mapping) else load_state_dict(weights)


def _shape(t) -> tuple:
    return tuple(int(s) for s in t.shape)


def _some(keys, n=3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(f"'{k}'" for k in keys[:n]) + more


def _diff(reference: Mapping, sd: Mapping, who: str, ref_name: str) -> None:
    """Raise if ``sd`` differs from ``reference`` in keys or shapes (the first offence, one line)."""
    absent = [k for k in reference if k not in sd]
    extra = [k for k in sd if k not in reference]
    if absent or extra:
        parts = []
        if absent:
            parts.append(f"{len(absent)} key(s) of the {ref_name} missing: {_some(absent)}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) not in the {ref_name}: {_some(extra)}")
        raise EPMQError(f"{who}: " + "; ".join(parts))
    for k, ref in reference.items():
        if _shape(sd[k]) != _shape(ref):
            raise EPMQError(f"{who}: key '{k}' has shape {_shape(sd[k])} but the {ref_name} has {_shape(ref)}")


def check_expert(base_sd: Mapping, expert_sd: Mapping, name: str) -> None:
    """Raise :class:`EPMQError` unless expert ``name`` has exactly the base's keys and shapes and finite values.

    Both state dicts must already be in the same layout (see :func:`clip_vision_keys`,
    :func:`openclip_visual_keys`).
    """
    import torch

    who = f"expert '{name}'"
    _diff(base_sd, expert_sd, who, "base")
    for k, t in expert_sd.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise EPMQError(f"{who}: key '{k}' has {bad} non-finite value(s) (NaN/Inf)")


def _load_strict(model, sd: Mapping, who: str):
    _diff(model.state_dict(), sd, who, "model")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise EPMQError(f"{folder}: no config.json (a model folder as written by save_pretrained is needed)")
    try:
        return json.loads(cfg.read_text())
    except Exception as e:
        raise EPMQError(f"{cfg}: unreadable JSON ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------- HF CLIP

CLIP_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
CLIP_VISION_PREFIX = "vision_model."
CLIP_NON_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
CLIP_VISION_LAYOUT = "flat"  # canonical: no `vision_model.` prefix, as transformers >= 5 CLIPVisionModel
CLIP_BUFFERS = ("embeddings.position_ids",)  # a non-persistent buffer older checkpoints still carry


def clip_vision_keys(sd: Mapping) -> dict:
    """The vision tower of a HF CLIP state dict in the canonical flat layout (``encoder.layers.0...``).

    Accepts ``CLIPVisionModel`` keys with the ``vision_model.`` prefix (transformers < 5) or without it
    (transformers >= 5) and full ``CLIPModel`` / ``CLIPVisionModelWithProjection`` state dicts, whose text
    tower, projections and ``logit_scale`` are dropped; unknown keys are kept so a strict load names them.
    """
    prefixed = [k for k in sd if k.startswith(CLIP_VISION_PREFIX)]
    flat = [k for k in sd if k.startswith(CLIP_VISION_ROOTS)]
    if prefixed and flat:
        raise EPMQError(
            f"CLIP state dict mixes layouts: '{prefixed[0]}' has the '{CLIP_VISION_PREFIX}' prefix but '{flat[0]}' not"
        )
    if not prefixed and not flat:
        first = next(iter(sd), "<empty>")
        raise EPMQError(f"not a CLIP vision state dict: no 'vision_model.*' or 'encoder.*' keys (first: '{first}')")
    out = {}
    for k, v in sd.items():
        if k.startswith(CLIP_VISION_PREFIX):
            k = k[len(CLIP_VISION_PREFIX) :]
        elif k.startswith(CLIP_NON_VISION):
            continue
        if k in CLIP_BUFFERS:
            continue
        out[k] = v
    return out


def _model_clip_prefix(model) -> str:
    """The key prefix the installed ``CLIPVisionModel`` expects: ``vision_model.`` before transformers 5."""
    return CLIP_VISION_PREFIX if hasattr(model, "vision_model") else ""


def clip_vision_config(folder):
    """``CLIPVisionConfig`` from ``folder/config.json``: a vision config or a ``CLIPConfig``'s ``vision_config``."""
    from transformers import CLIPVisionConfig

    folder = Path(folder)
    raw = _read_config(folder)
    if isinstance(raw.get("vision_config"), Mapping):
        raw = dict(raw["vision_config"])
    elif raw.get("model_type") not in (None, "clip_vision_model"):
        raise EPMQError(f"{folder / 'config.json'}: model_type '{raw.get('model_type')}' is not a CLIP (vision) model")
    return CLIPVisionConfig.from_dict(raw)


def load_clip_vision(source_or_dir, *, weights=None):
    """A ``transformers.CLIPVisionModel`` (eval mode) built from the folder's ``config.json`` (no remote code).

    ``source_or_dir``: local folder or hub id (see :func:`resolve`); ``weights``: a file, folder or state dict
    to load instead of the folder's own (e.g. merged weights), in any layout :func:`clip_vision_keys` accepts.
    """
    from transformers import CLIPVisionModel

    folder = resolve(source_or_dir)
    model = CLIPVisionModel(clip_vision_config(folder))
    sd = clip_vision_keys(_state_dict(folder if weights is None else weights))
    prefix = _model_clip_prefix(model)
    sd = {prefix + k: v for k, v in sd.items()}
    return _load_strict(model, sd, f"CLIP vision weights for {source_or_dir}")


# --------------------------------------------------------------------------------------------- open_clip

OPENCLIP_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
OPENCLIP_VISION_KEYS = {  # supported vision_cfg keys -> VisionTransformer argument (None: handled specially)
    "image_size": "image_size",
    "patch_size": "patch_size",
    "width": "width",
    "layers": "layers",
    "head_width": None,
    "mlp_ratio": "mlp_ratio",
    "ls_init_value": "ls_init_value",
    "patch_dropout": "patch_dropout",
    "no_ln_pre": "no_ln_pre",
    "pool_type": "pool_type",
    "final_ln_after_pool": "final_ln_after_pool",
    "output_tokens": "output_tokens",
    "pos_embed_type": "pos_embed_type",
    "attentional_pool": "attentional_pool",
    "attn_pooler_queries": "attn_pooler_queries",
    "attn_pooler_heads": "attn_pooler_heads",
}
OPENCLIP_WRAPPERS = ("module.", "model.")  # DataParallel / task-arithmetic ImageEncoder(model=CLIP)


def _openclip_config_dir() -> Path:
    mod = sys.modules.get("open_clip")
    if mod is not None and getattr(mod, "__path__", None):
        roots = list(mod.__path__)
    else:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise EPMQError("open_clip is not installed: pip install --no-deps open_clip_torch")
        roots = list(spec.submodule_search_locations)
    return Path(roots[0]) / "model_configs"


def openclip_model_config(arch: str) -> dict:
    """open_clip's shipped model config for ``arch`` (``open_clip/model_configs/<arch>.json``)."""
    path = _openclip_config_dir() / f"{arch}.json"
    if not path.is_file():
        raise EPMQError(f"unknown open_clip architecture '{arch}': no {path.name} in {path.parent} ({OPENCLIP_ARCHS})")
    return json.loads(path.read_text())


def build_openclip_visual(arch, *, quick_gelu: bool = True, output_dim: int | None = None):
    """An open_clip ``VisionTransformer`` with random weights.

    ``arch``: a model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...), a full open_clip model config
    (``{"embed_dim": ..., "vision_cfg": {...}}``) or a bare ``vision_cfg`` dict. ``quick_gelu``: OpenAI's
    weights (the task-arithmetic checkpoints) were trained with QuickGELU; pass False for GELU-trained ones
    (a config with ``"quick_gelu": true`` forces it on). ``output_dim`` defaults to the config's ``embed_dim``.
    """
    from torch import nn

    from epmq.models.openclip import open_clip_transformer

    what = arch if isinstance(arch, str) else "dict"
    cfg = openclip_model_config(arch) if isinstance(arch, str) else dict(arch)
    if "vision_cfg" in cfg:
        quick_gelu = quick_gelu or bool(cfg.get("quick_gelu", False))
        output_dim = output_dim if output_dim is not None else cfg.get("embed_dim")
        cfg = dict(cfg["vision_cfg"])
    embed_dim = cfg.pop("embed_dim", None)
    output_dim = output_dim if output_dim is not None else embed_dim
    unknown = sorted(k for k in cfg if k not in OPENCLIP_VISION_KEYS)
    if unknown:
        raise EPMQError(f"open_clip vision_cfg of {what}: unsupported key(s) {unknown}")
    if output_dim is None:
        raise EPMQError("open_clip vision tower: output_dim (the config's embed_dim) is not known")
    if isinstance(cfg.get("layers"), (list, tuple)):
        raise EPMQError("open_clip vision_cfg: 'layers' is a list (a ModifiedResNet), only ViTs are supported")
    T = open_clip_transformer()
    kwargs = {OPENCLIP_VISION_KEYS[k]: v for k, v in cfg.items() if OPENCLIP_VISION_KEYS[k] is not None}
    width = int(cfg.get("width", 768))  # defaults: open_clip's CLIPVisionCfg
    kwargs = {"image_size": 224, "patch_size": 16, "layers": 12, "mlp_ratio": 4.0, **kwargs}
    kwargs.update(width=width, heads=width // int(cfg.get("head_width", 64)))
    return T.VisionTransformer(
        **kwargs,
        output_dim=int(output_dim),
        act_layer=T.QuickGELU if quick_gelu else nn.GELU,
        norm_layer=T.LayerNorm,
    )


def openclip_visual_keys(sd: Mapping) -> dict:
    """The visual tower of an open_clip state dict, as bare ``VisionTransformer`` keys (``conv1.weight``, ...).

    Accepts a full ``CLIP`` state dict (``visual.*``), a bare visual one, and either wrapped in ``module.`` or
    ``model.`` (task-arithmetic ``ImageEncoder`` checkpoints: ``model.visual.*``).
    """
    prefixes = {m.group(1) for k in sd if (m := re.match(r"^((?:\w+\.)*?visual\.)", k))}
    if len(prefixes) > 1:
        raise EPMQError(f"open_clip state dict has several visual towers: prefixes {sorted(prefixes)}")
    if prefixes:
        (p,) = prefixes
        return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
    out = dict(sd)
    for wrapper in OPENCLIP_WRAPPERS:
        if out and all(k.startswith(wrapper) for k in out):
            out = {k[len(wrapper) :]: v for k, v in out.items()}
    return out


def load_openclip_visual(arch, weights, *, quick_gelu: bool = True):
    """open_clip's ``VisionTransformer`` for ``arch`` (see :func:`build_openclip_visual`) with ``weights``
    (file, folder or state dict; full CLIP, bare visual or wrapped, see :func:`openclip_visual_keys`) loaded
    strictly, in eval mode. For a ``vision_cfg`` dict without ``embed_dim`` the output size comes from ``proj``.
    """
    sd = openclip_visual_keys(_state_dict(weights))
    output_dim = None
    cfg = openclip_model_config(arch) if isinstance(arch, str) else dict(arch)
    if "embed_dim" not in cfg and "proj" in sd:
        output_dim = int(sd["proj"].shape[1])
    model = build_openclip_visual(cfg, quick_gelu=quick_gelu, output_dim=output_dim)
    return _load_strict(model, sd, f"open_clip {arch if isinstance(arch, str) else 'vision'} weights")


# --------------------------------------------------------------------------------------------- FLAN-T5

T5_SHARED = "shared.weight"
T5_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
T5_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
T5_LINEAR = re.compile(
    r"^(encoder|decoder)\.block\.\d+\.layer\.\d+\."
    r"(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))$"
)


def t5_head_tied(config: Mapping) -> bool:
    """Whether a T5 ``config.json`` describes a head tied to ``shared.weight`` (original T5) or not (v1.1, FLAN).

    Before transformers 5 this is ``tie_word_embeddings``; transformers 5 always writes
    ``tie_word_embeddings: true`` and keeps the distinction in ``scale_decoder_outputs`` (false for FLAN-T5).
    """
    if "scale_decoder_outputs" in config:
        return bool(config["scale_decoder_outputs"])
    return config.get("tie_word_embeddings", True) is not False


def _t5_fill_tied(model, sd: dict, head_tied: bool, who: str) -> dict:
    """Fill tied keys a checkpoint omitted from ``shared.weight``; untie those it stores with other values."""
    import torch
    from torch import nn

    sd = {k: v for k, v in sd.items() if k not in T5_IGNORED or k in model.state_dict()}
    if T5_SHARED not in sd:
        present = [k for k in T5_TIED[:2] if k in sd]
        if not present:
            raise EPMQError(f"{who}: no '{T5_SHARED}' (nor an embed_tokens copy of it) in the checkpoint")
        sd[T5_SHARED] = sd[present[0]]
    if "lm_head.weight" not in sd and not head_tied:
        raise EPMQError(
            f"{who}: 'lm_head.weight' is missing but config.json describes an untied head "
            "(tie_word_embeddings=false or scale_decoder_outputs=false, as FLAN-T5)"
        )
    tied = getattr(model, "all_tied_weights_keys", None)
    shared = model.get_parameter(T5_SHARED)
    for key in T5_TIED:
        if key not in sd:
            sd[key] = sd[T5_SHARED]
            continue
        untied = key == "lm_head.weight" and not head_tied
        if model.get_parameter(key) is shared and (untied or not torch.equal(sd[key], sd[T5_SHARED])):
            parent, attr = key.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, nn.Parameter(sd[key].detach().to(shared.dtype).clone()))
            if isinstance(tied, dict):
                tied.pop(key, None)
    return sd


def load_t5(source_or_dir, *, weights=None):
    """A ``transformers.T5ForConditionalGeneration`` (eval mode) from the folder's ``config.json`` and weights.

    Tied keys a checkpoint may omit (``lm_head.weight``, ``encoder/decoder.embed_tokens.weight``) are taken
    from ``shared.weight``, except an untied head (FLAN-T5, see :func:`t5_head_tied`), which must be present
    and is loaded as its own parameter; ``weights`` (file, folder or state dict) overrides the folder's.
    """
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    folder = resolve(source_or_dir)
    raw = _read_config(folder)
    if raw.get("model_type") not in (None, "t5"):
        raise EPMQError(f"{folder / 'config.json'}: model_type '{raw.get('model_type')}' is not t5")
    model = T5ForConditionalGeneration(T5Config.from_dict(raw))
    who = f"T5 weights for {source_or_dir}"
    sd = _state_dict(folder if weights is None else weights)
    sd = _t5_fill_tied(model, sd, t5_head_tied(raw), who)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return _load_strict(model, sd, who)


def _t5_untie_head(model) -> None:
    """Give ``lm_head`` a parameter of its own (a copy of ``shared.weight``) where transformers tied it."""
    from torch import nn

    if model.get_parameter("lm_head.weight") is model.get_parameter(T5_SHARED):
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop("lm_head.weight", None)


def build_t5(config: Mapping):
    """A ``T5ForConditionalGeneration`` (random weights, eval mode) for a ``config.json`` dict, its head untied
    when the config describes an untied one (FLAN-T5, :func:`t5_head_tied`) -- the architecture
    :func:`load_t5` would load into."""
    from transformers import T5Config, T5ForConditionalGeneration

    if config.get("model_type") not in (None, "t5"):
        raise EPMQError(f"model_type '{config.get('model_type')}' is not t5")
    model = T5ForConditionalGeneration(T5Config.from_dict(dict(config)))
    if not t5_head_tied(config):
        _t5_untie_head(model)
    return model.eval()


def load_t5_weights(model, weights, who: str, *, head_tied: bool):
    """Load ``weights`` (file, folder or state dict; tied keys may be omitted, see :func:`load_t5`) strictly
    into ``model`` (from :func:`build_t5`); keys or shapes that differ raise :class:`EPMQError` naming ``who``."""
    sd = _t5_fill_tied(model, _state_dict(weights), head_tied, who)
    return _load_strict(model, sd, who)


def tied_aliases(model) -> set[str]:
    """State-dict keys of ``model`` that name a tensor an earlier key already names (tied weights: T5's
    ``encoder/decoder.embed_tokens.weight`` = ``shared.weight``)."""
    seen, out = set(), set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            out.add(k)
        seen.add(id(v))
    return out


def unique_state_dict(model) -> dict:
    """``model.state_dict()`` without :func:`tied_aliases` (safetensors stores no shared tensors; loaders of
    tied architectures refill them). Models without tied weights: the whole state dict."""
    drop = tied_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def t5_linear_names(model) -> list[str]:
    """Parameter names of the encoder and decoder Linears merging and quantization act on, in model order:
    q/k/v/o of ``SelfAttention`` and ``EncDecAttention`` and ``wi``/``wi_0``/``wi_1``/``wo`` of ``DenseReluDense``
    (embeddings, layer norms, relative attention biases and ``lm_head`` stay out)."""
    from torch import nn

    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and T5_LINEAR.match(n)]
