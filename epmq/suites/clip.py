"""``clip``: the paper's real vision setting -- fine-tuned CLIP experts (FusionBench / task arithmetic) merged,
the merged *vision encoder* quantized, each task scored with its zero-shot text head. Needs internet once
(:meth:`ClipSuite.prefetch`); everything after that reads caches only.

Models
    ``base`` (hub id or local folder of a transformers ``CLIPModel``, default ``openai/clip-vit-base-patch32``)
    gives the base vision tower, ``visual_projection``, ``logit_scale`` and the text tower the heads are built
    with. ``experts`` gives one fine-tuned vision tower per task (default ``tanganke/clip-vit-base-patch32_{task}``,
    FusionBench's ``CLIPVisionModel`` experts: either transformers layout, with or without ``vision_model.``).

    ``layout="hf"`` (default): the encoder is a transformers ``CLIPVisionModel`` (adapter ``hf_clip_vision``),
    called as ``encoder(pixel_values=x)``; its state dict is the canonical flat layout of
    :func:`epmq.models.sources.clip_vision_keys` (``embeddings.*``, ``encoder.layers.*``, ...). With
    transformers < 5 the encoder is the model's inner ``vision_model`` (a ``CLIPVisionTransformer``), so the
    keys are flat there too. ``visual_projection`` is *not* part of the encoder (FusionBench's experts do not
    carry it and never change it): it is kept in full precision with the heads, in
    ``heads/projection.safetensors``, and applied by every head.

    ``layout="open_clip"``: the encoder is open_clip's ``VisionTransformer`` (adapter ``openclip_vit``: fused
    ``in_proj``), called as ``encoder(x)``, whose output is already projected (``proj`` is part of it).
    ``arch`` (an open_clip model name such as ``ViT-B-32``, or a config dict) defaults to the architecture
    read off the HF base's config. The base tower is the HF base converted (q/k/v fused, ``proj =
    visual_projection.T``: OpenAI's weights are the same in both libraries), or ``base_visual`` (a file of an
    open_clip state dict, e.g. the task-arithmetic ``zeroshot`` encoder converted to safetensors). Experts
    may be open_clip state-dict files (full CLIP, bare visual, or ``model.visual.*``) or HF ``CLIPVisionModel``
    folders / hub ids (converted the same way, with the base's projection).

Heads (``head(task)``, built by ``build_base``)
    CLIP zero-shot heads: the task's class names (:mod:`epmq.tasks.clip`, the spellings FusionBench's experts
    were trained against) x its prompt templates through the base's text tower
    (:func:`epmq.tasks.heads.zeroshot_head`); row ``c`` = ``exp(logit_scale) * normalize(mean_t
    normalize(text(c, t)))``. The head module maps encoder outputs to logits:
    ``logits = normalize(features) @ W.T`` with ``features = visual_projection(pooler_output)`` (hf) or the
    open_clip tower's output; it runs in float32 and is never merged or quantized.

Data (HF hub datasets of :mod:`epmq.tasks.clip`; ``datasets={task: folder}`` reads ``save_to_disk`` copies)
    * ``test``: the task's ``test_split`` (food101: ``validation``); ``max_test`` keeps the first N rows of a
      seeded permutation (deterministic, the same for every model).
    * ``validation``: ``n_val`` rows carved from ``train_split`` by a seeded uniform permutation (random, not
      stratified: a 256-row carve cannot stratify 397 SUN classes anyway); used to select merge
      hyperparameters.
    * ``train`` (the calibration pool): the next ``calib_pool`` rows of the same permutation, so it is disjoint
      from validation by construction; :meth:`ClipSuite.calibration_batches` draws ``n`` of them per seed.
    The permutations depend on the suite ``seed`` and the task name only. Each subset is preprocessed ONCE
    like CLIP's own transform -- RGB, shorter side resized to ``image_size`` (PIL bicubic, antialiased, long
    side ``int(S * long / short)``), center crop ``S`` (offset ``round((len - S) / 2)``) -- with PIL + numpy
    and cached as uint8 ``[N, 3, S, S]`` (+ int64 labels and source row indices); CLIP mean/std
    normalisation is applied per batch in float. Evaluation reads the cache in slices, so memory stays
    bounded. Sizes at 224 px (150 KB per image): the 8 test splits hold ~86k images, about 13 GB
    (SUN397 19.9k, SVHN 26k, GTSRB 12.6k, MNIST 10k, Cars 8k, RESISC45 6.3k, EuroSAT 2.7k, DTD 1.9k);
    validation + pool add 1280 x 8 images (1.5 GB).

Downloads (``prefetch``): the base (~0.6 GB for B/32 safetensors; L/14 1.7 GB), 8 experts (~0.35 GB each for
B/32) through ``huggingface_hub`` into the HF cache, and the datasets (a few GB, SUN397 the largest) through
``datasets`` into ``data_dir`` / the HF datasets cache. Offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``)
``prefetch`` only checks the caches and raises ONE error listing everything missing.

Revisions (``revisions={"models": {hub id: rev}, "datasets": {hub id: rev}}``; the paper configs set it)
    ``rev`` is a 40-hex commit SHA or a branch / tag name; once ``revisions`` is given, every hub model and hub
    dataset the suite reads needs an entry and no other may appear (``epmq pin`` resolves branches to commits).
    Every download gets its revision (``snapshot_download(revision=...)``, ``load_dataset(revision=...)``); the
    commit actually read is recorded in every artefact's JSON (``revision``, beside ``revision_pinned``) and in
    ``prefetch``'s result (the workflow's ``fetched.json``). A commit pin is never silently replaced: a cache
    snapshot, a loaded dataset (offline, ``datasets`` takes the latest cached revision whatever is asked) or a
    cached artefact of another commit raises :class:`EPMQError` naming the model or dataset. The heads and the
    tokenizer read the base at the commit recorded in ``base.json``, so they match the base's weights.

Cache layout under ``cache_dir`` (metadata = the artefact's path ``.with_suffix(".json")``)::

    base.safetensors              base.json          # encoder state dict (layout above); sources, revision
    heads/<task>.safetensors      heads/<task>.json  # zero-shot head [n_classes, dim], logit scale applied
    heads/projection.safetensors  ...json            # visual_projection.weight [dim, width] (layout "hf")
    experts/<task>.safetensors    experts/<task>.json
    data/<task>/{test,validation,train}.safetensors  # uint8 images, labels, source indices (+ .json)

Every file is written atomically. An artefact whose recorded sources differ from the options (another
``base``, expert source, layout, data source, image size, seed, ...) is rebuilt, never silently reused.

CLI::

    python -m epmq.suites.clip fetch --cache DIR [--set k=v ...] [--preprocess]   # downloads (internet)
    python -m epmq.suites.clip build --cache DIR [--set k=v ...]                  # base/heads/experts table
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

from epmq.errors import EPMQError
from epmq.evaluate import accuracy_record
from epmq.io import save_safetensors_atomic, write_json_atomic
from epmq.io import stderr_isatty as _isatty
from epmq.suites.base import Suite, parse_set_options
from epmq.tasks.clip import TASKS_8, get_task

#: options and their defaults (the paper's ViT-B/32 8-task setting).
DEFAULTS = {
    "base": "openai/clip-vit-base-patch32",
    "experts": "tanganke/clip-vit-base-patch32_{task}",  # format string with {task}, or {task: source}
    "layout": "hf",  # "hf" (transformers CLIPVisionModel) | "open_clip" (open_clip VisionTransformer)
    "arch": None,  # open_clip: model name (ViT-B-32) or config dict; None = read off the base's config
    "base_visual": None,  # open_clip: state-dict file of the base tower; None = converted from `base`
    "tasks": TASKS_8,
    "datasets": None,  # {task: local save_to_disk folder} overriding the hub dataset
    "image_size": 224,
    "n_val": 256,  # validation rows carved from train (seeded)
    "calib_pool": 1024,  # train rows (disjoint from validation) preprocessed for calibration draws
    "max_test": None,  # cap on each test split (None: all)
    "eval_batch_size": 256,
    "precision": "fp32",  # evaluation autocast: fp32 | bf16 | fp16
    "device": "auto",
    "threads": None,
    "progress": None,  # None: when stderr is a TTY
    "data_dir": None,  # datasets cache_dir (None: the HF datasets cache)
    "revisions": None,  # {"models": {hub id: revision}, "datasets": {hub id: revision}} (module doc); None: unpinned
}
FORMAT_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("fp32", "bf16", "fp16")  # the names of epmq.precision.DTYPES
LAYOUTS = ("hf", "open_clip")
SPLITS = ("test", "validation", "train")
PROJECTION = "projection"  # heads/projection.safetensors
_DATA_KEY = "epmq_data"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether models must come from the HF cache only (``HF_HUB_OFFLINE``)."""
    from epmq.models.sources import _offline

    return _offline()


def datasets_offline() -> bool:
    """Whether datasets must come from the cache only (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return _env_flag("HF_DATASETS_OFFLINE") or _env_flag("HF_HUB_OFFLINE")


@contextlib.contextmanager
def _datasets_offline_mode():
    """``datasets`` reads its offline flag at import; honour the variables as they are set now."""
    import datasets.config as dc

    old = dc.HF_HUB_OFFLINE
    if datasets_offline():
        dc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE = old


def _revision(folder: Path) -> str | None:
    """The commit hash of an HF-cache snapshot folder (``.../snapshots/<hash>``), else None."""
    from epmq.models.sources import snapshot_revision

    return snapshot_revision(folder)


def dataset_commit(ds) -> str | None:
    """The hub commit a ``datasets`` split was built from: the ``<hash>`` folder of its Arrow cache files
    (``<cache>/<owner>___<name>/<config>/<version>/<hash>/``, where hub datasets use the commit SHA), else None."""
    from epmq.models.sources import is_commit

    for f in getattr(ds, "cache_files", None) or ():
        name = Path(f.get("filename", "")).parent.name
        return name if is_commit(name) else None
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------------------------- preprocessing


def to_pil(value):
    """A PIL image from what a ``datasets`` image column holds (PIL, ``{"bytes", "path"}``, or an array)."""
    import io

    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise EPMQError(f"image of type {type(value).__name__}: expected a PIL image, bytes/path dict or array")


def clip_preprocess(image, size: int):
    """CLIP's image transform up to the tensor: RGB, shorter side -> ``size`` (bicubic), center crop ``size``.

    Returns uint8 ``[3, size, size]`` (numpy). Matches ``Resize(size, BICUBIC) + CenterCrop(size)`` on PIL
    images (long side ``int(size * long / short)``, crop offset ``round((len - size) / 2)``).
    """
    import numpy as np
    from PIL import Image

    img = to_pil(image).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)  # as torchvision's CenterCrop
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def normalize_images(x):
    """uint8 ``[B, 3, S, S]`` -> float32, CLIP mean/std normalised."""
    import torch

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


# --------------------------------------------------------------------------------------------- HF -> open_clip


def openclip_config_from_hf(vision_config, projection_dim: int) -> dict:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``quick_gelu``) equal to a HF vision config."""
    c = vision_config
    return {"embed_dim": int(projection_dim), "quick_gelu": c.hidden_act == "quick_gelu",
            "vision_cfg": {"image_size": int(c.image_size), "patch_size": int(c.patch_size),
                           "width": int(c.hidden_size), "layers": int(c.num_hidden_layers),
                           "head_width": int(c.hidden_size // c.num_attention_heads),
                           "mlp_ratio": c.intermediate_size / c.hidden_size}}


def hf_to_openclip_visual(sd: Mapping, projection) -> dict:
    """A HF CLIP vision state dict (canonical flat keys) + ``visual_projection.weight`` -> open_clip
    ``VisionTransformer`` keys (q/k/v fused into ``in_proj``; ``proj = projection.T``)."""
    import torch

    out = {"conv1.weight": sd["embeddings.patch_embedding.weight"],
           "class_embedding": sd["embeddings.class_embedding"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_pre.weight": sd["pre_layrnorm.weight"], "ln_pre.bias": sd["pre_layrnorm.bias"],
           "ln_post.weight": sd["post_layernorm.weight"], "ln_post.bias": sd["post_layernorm.bias"],
           "proj": projection.t().contiguous()}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{o}{b}.{p}"] = sd[f"{h}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{o}attn.in_proj_{p}"] = torch.cat([sd[f"{h}self_attn.{q}_proj.{p}"] for q in "qkv"])
    want = _hf_vision_keys(len(layers))
    extra, absent = sorted(set(sd) - set(want)), [k for k in want if k not in sd]
    if extra or absent:
        raise EPMQError(f"HF CLIP vision state dict: not convertible to open_clip (unexpected {extra[:3]}, "
                        f"missing {absent[:3]})")
    return out


def _hf_vision_keys(n_layers: int) -> list[str]:
    keys = ["embeddings.patch_embedding.weight", "embeddings.class_embedding", "embeddings.position_embedding.weight",
            "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias"]
    for i in range(n_layers):
        for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"encoder.layers.{i}.{m}.weight", f"encoder.layers.{i}.{m}.bias"]
    return keys


# --------------------------------------------------------------------------------------------- head


def _head_class():
    import torch
    from torch import nn

    class ZeroShotHead(nn.Module):
        """Frozen CLIP zero-shot classifier on encoder outputs: ``normalize(features) @ weight.T`` (float32),
        ``features = outputs.pooler_output @ projection.T`` (HF) or the tensor itself (open_clip)."""

        def __init__(self, weight: torch.Tensor, projection: torch.Tensor | None = None):
            super().__init__()
            self.register_buffer("weight", weight.detach().float().clone())
            self.register_buffer("projection", None if projection is None else projection.detach().float().clone())

        @property
        def logit_scale(self) -> float:
            return float(self.weight.norm(dim=-1).mean())

        def features(self, outputs) -> torch.Tensor:
            x = outputs.pooler_output if hasattr(outputs, "pooler_output") else outputs
            if isinstance(x, (tuple, list)):
                x = x[0]
            x = x.float()
            return x @ self.projection.t() if self.projection is not None else x

        def forward(self, outputs) -> torch.Tensor:
            return nn.functional.normalize(self.features(outputs), dim=-1) @ self.weight.t()

    return ZeroShotHead


# --------------------------------------------------------------------------------------------- suite


def check_hub_options(cfg: dict, who: str, lookup, int_lows) -> tuple:
    """The option checks the hub suites share (``who`` starts every message): ``tasks`` (set to a tuple,
    registry spelling via ``lookup``, no repeats), the integer options ``int_lows`` (``(key, lowest)``),
    ``max_test``, ``experts`` (a dict with every task or a ``{task}`` format string) and ``datasets``. Returns
    the tasks."""
    tasks = (cfg["tasks"],) if isinstance(cfg["tasks"], str) else tuple(cfg["tasks"])
    if not tasks or len(set(tasks)) != len(tasks):
        raise EPMQError(f"{who}: tasks={list(tasks)!r}: expected a non-empty list without repeats")
    for t in tasks:
        if lookup(t).name != t:
            raise EPMQError(f"{who}: task {t!r}: use the registry's spelling {lookup(t).name!r}")
    cfg["tasks"] = tasks
    for key, low in int_lows:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise EPMQError(f"{who}: {key}={v!r}: expected an integer >= {low}")
    mt = cfg["max_test"]
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
        raise EPMQError(f"{who}: max_test={mt!r}: expected None or an integer >= 1")
    ex = cfg["experts"]
    if isinstance(ex, Mapping):
        absent = [t for t in tasks if t not in ex]
        if absent:
            raise EPMQError(f"{who}: experts has no source for task(s) {absent}")
    elif not isinstance(ex, str) or ("{task}" not in ex and len(tasks) > 1):
        raise EPMQError(f"{who}: experts={ex!r}: expected a format string with '{{task}}' or a dict")
    ds = cfg["datasets"]
    if ds is not None and not isinstance(ds, Mapping):
        raise EPMQError(f"{who}: datasets={ds!r}: expected a dict task -> local dataset folder")
    check_revisions_option(cfg.get("revisions"), who)
    return tasks


def check_revisions_option(revs, who: str) -> None:
    """The shape of a hub suite's ``revisions`` option: None, or ``{"models": {hub id: rev}, "datasets": {hub id:
    rev}}`` (either part may be absent), each ``rev`` a commit SHA or a branch / tag name."""
    from epmq.models.sources import check_revision

    if revs is None:
        return
    if not isinstance(revs, Mapping) or set(revs) - {"models", "datasets"}:
        raise EPMQError(f"{who}: revisions={revs!r}: expected {{'models': {{hub id: revision}}, "
                        "'datasets': {hub id: revision}}")
    for kind in ("models", "datasets"):
        pins = revs.get(kind)
        if pins is None:
            continue
        if not isinstance(pins, Mapping):
            raise EPMQError(f"{who}: revisions.{kind}={pins!r}: expected a dict hub id -> revision")
        for hub_id, rev in pins.items():
            check_revision(rev, f"{who}: revisions.{kind}[{hub_id!r}]")


class HubSuiteMixin:
    """Cache layout, seeded splits and small helpers shared by the hub-backed suites (``clip``, ``t5-glue``).
    Expects ``name``, ``format_version``, ``tasks``, ``cache_dir``, ``seed``, ``_device_cache`` and ``cfg``
    (``experts``, ``device``, ``progress``, ``max_test``, ``n_val``, ``calib_pool``, ``datasets``, ``revisions``) on
    the suite, and its ``_check_task``/``build_expert``/``load_encoder``/``model_sources``/``hub_dataset_id``."""

    # -- hub revisions (see the module doc, "Revisions") ---------------------------------------------------------
    def _pins(self, kind: str) -> dict:
        return {str(k): v for k, v in ((self.cfg.get("revisions") or {}).get(kind) or {}).items()}

    def model_revision(self, source) -> str | None:
        """The revision ``revisions.models`` pins hub model ``source`` to (None: unpinned, the default branch)."""
        return self._pins("models").get(str(source))

    def dataset_revision(self, hf_dataset) -> str | None:
        """The revision ``revisions.datasets`` pins hub dataset ``hf_dataset`` to (None: unpinned)."""
        return self._pins("datasets").get(str(hf_dataset))

    def hub_models(self) -> list[str]:
        """The model sources read from the hub (hub ids that are no existing local path), in order."""
        from epmq.models.sources import is_hub_id

        return [s for s in dict.fromkeys(self.model_sources()) if is_hub_id(s) and not Path(s).expanduser().exists()]

    def _local_dataset(self, task: str):
        return (self.cfg["datasets"] or {}).get(task)

    def hub_datasets(self) -> list[str]:
        """The hub dataset ids the tasks read (a task given a local ``datasets`` folder reads none), in order."""
        return list(dict.fromkeys(self.hub_dataset_id(t) for t in self.tasks if self._local_dataset(t) is None))

    def _check_revisions(self, who: str) -> None:
        """Once ``revisions`` is set, every hub model and dataset has a pin, and every pin names one of them."""
        if self.cfg.get("revisions") is None:
            return
        for kind, used in (("models", self.hub_models()), ("datasets", self.hub_datasets())):
            pins = self._pins(kind)
            absent = [u for u in used if u not in pins]
            if absent:
                raise EPMQError(f"{who}: revisions.{kind} has no revision for {absent} (with revisions set, every "
                                f"hub {kind[:-1]} needs one: a commit SHA, or a branch that `epmq pin` resolves)")
            extra = [k for k in pins if k not in used]
            if extra:
                raise EPMQError(f"{who}: revisions.{kind} names {extra}, which this suite does not read from the hub "
                                f"(it reads {used})")

    def _resolve_model(self, source, *, revision=None) -> Path:
        """:func:`epmq.models.sources.resolve` at ``revision`` (default: the pinned one)."""
        from epmq.models.sources import resolve

        return resolve(source, revision=revision or self.model_revision(source))

    @staticmethod
    def _check_pin(what: str, pinned, recorded, path: Path) -> None:
        """Refuse to reuse an artefact built from another commit than the one ``what`` is pinned to."""
        from epmq.models.sources import is_commit

        if is_commit(pinned) and recorded != pinned:
            raise EPMQError(f"{what} is pinned to revision {pinned} but the cached {path} was built from "
                            f"{recorded or 'an unrecorded revision'}: delete it (and whatever was built from it) to "
                            f"rebuild from the pinned revision, or pin {recorded or 'the revision it was built from'}")

    def _dataset_provenance(self, task: str, ds) -> dict:
        """The ``hub_dataset`` / ``revision`` (commit read) / ``revision_pinned`` fields of a data artefact."""
        if self._local_dataset(task) is not None:
            return {"hub_dataset": None, "revision": None, "revision_pinned": None}
        hub = self.hub_dataset_id(task)
        return {"hub_dataset": hub, "revision": dataset_commit(ds), "revision_pinned": self.dataset_revision(hub)}

    def _prefetch_models(self, problems: list) -> dict:
        """Download (offline: check) every model source at its pinned revision; ``{source: commit read}`` (None
        for a local path); what fails is appended to ``problems``."""
        from epmq.models.sources import is_hub_id, resolve

        out = {}
        for s in dict.fromkeys(self.model_sources()):
            try:
                out[s] = _revision(resolve(s, revision=self.model_revision(s)))
            except EPMQError as e:
                if not hub_offline():
                    problems.append(f"model {s} ({_first_line(e)[:120]})")
                elif not is_hub_id(s):
                    problems.append(f"model {s} (no such local path)")
                else:
                    pinned = " (cached at another revision than the pinned one)" if "is pinned to" in str(e) else ""
                    problems.append(f"model {s}{pinned}")
        return out

    def data_path(self, task: str, split: str) -> Path:
        return self.cache_dir / "data" / task / f"{split}.safetensors"

    def config(self) -> dict:
        """The suite's options as JSON (recorded in metadata)."""
        cfg = dict(self.cfg)
        cfg["tasks"] = list(cfg["tasks"])
        for k in ("experts", "datasets"):
            if isinstance(cfg[k], Mapping):
                cfg[k] = {t: str(v) for t, v in cfg[k].items()}
        return {"suite": self.name, "format": self.format_version, "seed": self.seed, **cfg}

    def build_expert(self, task: str) -> Path:
        """Import ``task``'s expert (cached; re-imported when its source or the base changed); return its path.
        The suite supplies ``_expert_key``, ``_build_base_file`` (the base weights, nothing else),
        ``_import_expert(folder, task, source)`` (the expert's state dict in the base's keys) and
        ``_expert_meta(task)`` (its own metadata fields)."""
        self._check_task(task)
        path = self.expert_path(task)
        key = self._expert_key(task)
        meta = self._read_json(path.with_suffix(".json"))
        self._build_base_file()
        if path.is_file() and meta and meta.get("key") == key:
            self._check_pin(f"expert '{task}' ({key['source']})", self.model_revision(key["source"]),
                            meta.get("revision"), path)
            return path
        from epmq.models.sources import check_expert

        t0 = time.perf_counter()
        src = key["source"]
        try:
            folder = self._resolve_model(src)
            sd = {k: (v.float() if v.is_floating_point() else v) for k, v in
                  self._import_expert(folder, task, src).items()}
            base = self.base_state_dict()
            check_expert(base, sd, task)
        except EPMQError as e:
            msg = str(e)
            raise EPMQError(msg if msg.startswith(f"expert '{task}'") else f"expert '{task}' ({src}): {msg}") from e
        num = sum(float((sd[k] - v).float().pow(2).sum()) for k, v in base.items() if v.is_floating_point())
        den = sum(float(v.float().pow(2).sum()) for v in base.values() if v.is_floating_point())
        meta = {"what": "expert", "task": task, "key": key, "source": src, "folder": str(folder),
                "revision": _revision(folder), "revision_pinned": self.model_revision(src), "base": self.cfg["base"],
                **self._expert_meta(task),
                "relative_delta": math.sqrt(num / max(den, 1e-30)), "seconds": time.perf_counter() - t0}
        save_safetensors_atomic(path, sd, {"task": task, "source": src})
        write_json_atomic(path.with_suffix(".json"), meta)
        return path

    def data_file(self, task: str, split: str) -> Path:
        """The preprocessed cache of ``task``/``split`` (``test``, ``validation``, ``train`` = calibration pool),
        built once by the suite's ``_build_data`` (see each suite's module doc)."""
        if split not in SPLITS:
            raise EPMQError(f"split={split!r}: expected one of {list(SPLITS)}")
        self._check_task(task)
        path = self.data_path(task, split)
        key = self._data_key(task, split)
        if not self._data_cached(path, key):
            self._build_data(task, split, path, key)
        elif self._local_dataset(task) is None:
            hub = self.hub_dataset_id(task)
            meta = self._read_json(path.with_suffix(".json")) or {}
            self._check_pin(f"dataset '{hub}' ({task}/{split})", self.dataset_revision(hub), meta.get("revision"), path)
        return path

    def expert_source(self, task: str) -> str:
        ex = self.cfg["experts"]
        return str(ex[task]) if isinstance(ex, Mapping) else ex.format(task=task)

    def device(self):
        if self._device_cache is None:
            from epmq.device import resolve

            self._device_cache = resolve(str(self.cfg["device"]))
        return self._device_cache

    def _bar(self, it, desc, total=None):
        from tqdm import tqdm

        p = self.cfg["progress"]
        return tqdm(it, desc=desc, total=total, leave=False, disable=not (_isatty() if p is None else p))

    def _rng(self, task: str, what: int):
        import numpy as np

        return np.random.default_rng([int(self.seed), zlib.crc32(task.encode()), what])

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def expert_encoder(self, task: str):
        return self.load_encoder(self.build_expert(task))

    def _data_cached(self, path: Path, key: dict) -> bool:
        from safetensors import safe_open

        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get(_DATA_KEY) == json.dumps(key, sort_keys=True)
        except Exception:  # noqa: BLE001 -- unreadable: rebuilt
            return False

    def _hf_dataset(self, task: str, hf_dataset: str, hf_config, split: str, columns, *, name: str,
                    source: str, fetch_hint: str, download_mode=None):
        """Split ``split`` of ``task``'s dataset: from ``cfg["datasets"][task]`` (a ``save_to_disk`` folder) when
        given, else from the hub at the pinned revision (offline mode unless the caller downloads), with
        ``columns`` checked. Every failure is one ``EPMQError`` line naming the task; ``name`` and ``source``
        name the dataset in the load and column messages, ``fetch_hint`` says how to get it. A hub split built
        from another commit than a pinned one is refused."""
        import datasets

        from epmq.models.sources import is_commit

        local = (self.cfg["datasets"] or {}).get(task)
        if local is not None:
            try:
                d = datasets.load_from_disk(str(local))
            except Exception as e:  # noqa: BLE001 -- FileNotFoundError, corrupt folder, ...
                raise EPMQError(f"{task}: cannot read local dataset {local} ({type(e).__name__}: "
                                f"{_first_line(e)})") from e
            if isinstance(d, datasets.DatasetDict):
                if split not in d:
                    raise EPMQError(f"{task}: local dataset {local} has no split {split!r} (has {list(d)})")
                d = d[split]
        else:
            pin = self.dataset_revision(hf_dataset)
            at = f" at revision '{pin}'" if pin else ""
            try:
                with _datasets_offline_mode():
                    d = datasets.load_dataset(hf_dataset, hf_config, split=split, cache_dir=self.cfg["data_dir"],
                                              download_mode=download_mode, revision=pin)
            except Exception as e:  # noqa: BLE001 -- offline, not found, network: one message
                where = "not in the local datasets cache (offline)" if datasets_offline() else "could not be loaded"
                raise EPMQError(f"{task}: dataset {name} split {split!r}{at} {where} ({type(e).__name__}: "
                                f"{_first_line(e)}); {fetch_hint} on a machine with internet, or pass "
                                "datasets={task: folder}") from e
            got = dataset_commit(d)
            if is_commit(pin) and got != pin:
                raise EPMQError(f"{task}: dataset {name} split {split!r} is pinned to revision {pin} but `datasets` "
                                f"loaded {got or 'a split of unknown revision'} (offline it takes the latest cached "
                                f"revision, whatever is asked): {fetch_hint} with internet, or remove the other "
                                "revision from the datasets cache")
        for col in columns:
            if col not in d.column_names:
                raise EPMQError(f"{task}: dataset {source} has no column {col!r} (columns {d.column_names})")
        return d

    def split_indices(self, task: str, split: str, n_rows: int):
        """Source-row indices (sorted int64 numpy) of ``split`` in a source split of ``n_rows`` rows."""
        import numpy as np

        if split == "test":
            mt = self.cfg["max_test"]
            if mt is None or mt >= n_rows:
                return np.arange(n_rows, dtype=np.int64)
            return np.sort(self._rng(task, 1).permutation(n_rows)[:mt]).astype(np.int64)
        n_val = self.cfg["n_val"]
        if n_val >= n_rows:
            raise EPMQError(f"{task}: n_val={n_val} leaves nothing of the {n_rows}-row train split for calibration")
        perm = self._rng(task, 0).permutation(n_rows)
        part = perm[:n_val] if split == "validation" else perm[n_val:n_val + self.cfg["calib_pool"]]
        return np.sort(part).astype(np.int64)


class ClipSuite(HubSuiteMixin, Suite):
    """The ``clip`` suite; options (constructor keywords) are listed in :data:`DEFAULTS` and the module doc."""

    name = "clip"
    format_version = FORMAT_VERSION

    def __init__(self, cache_dir, *, seed: int = 0, **options):
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise EPMQError(f"clip suite: unknown option(s) {unknown}; expected some of {sorted(DEFAULTS)}")
        super().__init__(cache_dir, seed=seed, **options)
        cfg = {**DEFAULTS, **options}
        if cfg["layout"] not in LAYOUTS:
            raise EPMQError(f"clip suite: layout={cfg['layout']!r}: expected one of {list(LAYOUTS)}")
        if cfg["precision"] not in PRECISIONS:
            raise EPMQError(f"clip suite: precision={cfg['precision']!r}: expected one of {list(PRECISIONS)}")
        tasks = check_hub_options(cfg, "clip suite", get_task,
                                  (("image_size", 8), ("n_val", 1), ("calib_pool", 1), ("eval_batch_size", 1)))
        if cfg["layout"] == "hf" and (cfg["arch"] is not None or cfg["base_visual"] is not None):
            raise EPMQError("clip suite: arch / base_visual apply to layout='open_clip' only")
        self.cfg = cfg
        self.tasks = tasks
        self._check_revisions("clip suite")
        self.adapter = "hf_clip_vision" if cfg["layout"] == "hf" else "openclip_vit"
        self._heads: dict = {}
        self._base_sd = None
        self._device_cache = None
        if cfg["threads"]:
            import torch

            torch.set_num_threads(int(cfg["threads"]))

    # -- paths ----------------------------------------------------------------------------------------------

    @property
    def projection_path(self) -> Path:
        return self.cache_dir / "heads" / f"{PROJECTION}.safetensors"

    def model_sources(self) -> list[str]:
        """Every model source this suite reads (base, base_visual, experts), in order."""
        out = [str(self.cfg["base"])]
        if self.cfg["base_visual"] is not None:
            out.append(str(self.cfg["base_visual"]))
        return out + [self.expert_source(t) for t in self.tasks]

    def hub_dataset_id(self, task: str) -> str:
        """The hub dataset ``task`` reads unless given a local folder (:mod:`epmq.tasks.clip`)."""
        return get_task(task).hf_dataset

    # -- small helpers -----------------------------------------------------------------------------------------

    def _autocast(self, device):
        from epmq.precision import autocast

        return autocast(device, self.cfg["precision"])



    # -- base ------------------------------------------------------------------------------------------------
    def _base_key(self) -> dict:
        c = self.cfg
        return {"base": str(c["base"]), "layout": c["layout"], "arch": c["arch"],
                "base_visual": None if c["base_visual"] is None else str(c["base_visual"]),
                "image_size": c["image_size"], "format": FORMAT_VERSION}

    def base_meta(self) -> dict:
        """``base.json`` (building the base if it is missing or was built from other sources)."""
        self._build_base_file()
        return json.loads(self.base_path.with_suffix(".json").read_text())

    def _base_cached(self) -> dict | None:
        meta = self._read_json(self.base_path.with_suffix(".json"))
        ok = self.base_path.is_file() and meta and meta.get("key") == self._base_key()
        ok = ok and (self.cfg["layout"] == "open_clip" or self.projection_path.is_file())
        if ok:
            base = self.cfg["base"]
            self._check_pin(f"base {base!r}", self.model_revision(base), meta.get("revision"), self.base_path)
            if self.cfg["base_visual"] is not None:
                bv = self.cfg["base_visual"]
                self._check_pin(f"base_visual {bv!r}", self.model_revision(bv),
                                (meta.get("base_visual") or {}).get("revision"), self.base_path)
        return meta if ok else None

    def _load_base_model_files(self):
        """(folder, raw state dict, CLIPConfig dict) of the HF base."""
        from epmq.models.sources import load_state_dict

        folder = self._resolve_model(self.cfg["base"])
        raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if not isinstance(raw.get("vision_config"), Mapping) or not isinstance(raw.get("text_config"), Mapping):
            raise EPMQError(f"base {self.cfg['base']!r}: {folder / 'config.json'} is not a CLIPModel config "
                            "(no vision_config / text_config): the text tower is needed for the zero-shot heads")
        return folder, load_state_dict(folder), raw

    def _build_base_file(self) -> Path:
        meta = self._base_cached()
        if meta is not None:
            return self.base_path
        from transformers import CLIPVisionConfig

        from epmq.models.sources import clip_vision_keys, load_state_dict, openclip_visual_keys

        t0 = time.perf_counter()
        folder, raw_sd, raw_cfg = self._load_base_model_files()
        for k in ("visual_projection.weight", "logit_scale"):
            if k not in raw_sd:
                raise EPMQError(f"base {self.cfg['base']!r}: no '{k}' in its weights (a full CLIPModel is needed)")
        vcfg = CLIPVisionConfig.from_dict(dict(raw_cfg["vision_config"]))
        if int(vcfg.image_size) != self.cfg["image_size"]:
            raise EPMQError(f"clip suite: image_size={self.cfg['image_size']} but base {self.cfg['base']!r} "
                            f"takes {vcfg.image_size}x{vcfg.image_size} images")
        projection = raw_sd["visual_projection.weight"].float()
        logit_scale = float(raw_sd["logit_scale"].float().exp())
        vision = {k: v.float() for k, v in clip_vision_keys(raw_sd).items()}
        meta = {"what": "base", "key": self._base_key(), "source": str(self.cfg["base"]), "folder": str(folder),
                "revision": _revision(folder), "revision_pinned": self.model_revision(self.cfg["base"]),
                "layout": self.cfg["layout"],
                "vision_config": json.loads(vcfg.to_json_string()), "projection_dim": int(projection.shape[0]),
                "logit_scale": logit_scale, "image_size": self.cfg["image_size"], "config": self.config()}
        if self.cfg["layout"] == "hf":
            sd = vision
        else:
            oc = self._openclip_config(vcfg, int(projection.shape[0]))
            meta["openclip_config"] = oc
            if self.cfg["base_visual"] is None:
                sd = hf_to_openclip_visual(vision, projection)
                meta["converted_from"] = "hf"
            else:
                bv = self._resolve_model(self.cfg["base_visual"])
                sd = {k: v.float() for k, v in openclip_visual_keys(load_state_dict(bv)).items()}
                meta["base_visual"] = {"source": str(self.cfg["base_visual"]), "revision": _revision(bv),
                                       "revision_pinned": self.model_revision(self.cfg["base_visual"])}
        enc = self._new_encoder(meta)
        self._strict_load(enc, sd, f"base {self.cfg['base']!r}")  # validates keys and shapes before writing
        meta["n_params"] = int(sum(v.numel() for v in sd.values()))
        meta["seconds"] = time.perf_counter() - t0
        if self.cfg["layout"] == "hf":
            save_safetensors_atomic(self.projection_path, {"weight": projection},
                                    {"source": self.cfg["base"], "revision": _revision(folder)})
            write_json_atomic(self.projection_path.with_suffix(".json"), {
                "what": "visual_projection.weight of the base (applied by every head)", "source": self.cfg["base"],
                "revision": _revision(folder), "shape": list(projection.shape)})
        save_safetensors_atomic(self.base_path, sd, {"source": self.cfg["base"], "layout": self.cfg["layout"]})
        write_json_atomic(self.base_path.with_suffix(".json"), meta)
        self._base_sd = None
        self._heads.clear()
        return self.base_path

    def _openclip_config(self, vcfg, projection_dim: int) -> dict:
        from epmq.models.sources import openclip_model_config

        arch = self.cfg["arch"]
        if arch is None:
            return openclip_config_from_hf(vcfg, projection_dim)
        return dict(openclip_model_config(arch)) if isinstance(arch, str) else dict(arch)

    def build_base(self) -> Path:
        """The base encoder (+ ``heads/projection`` for layout hf) and every task's zero-shot head."""
        path = self._build_base_file()
        self._build_heads(self.tasks)
        return path

    def base_state_dict(self) -> dict:
        if self._base_sd is None:
            from epmq.models.sources import load_state_dict

            self._base_sd = load_state_dict(self._build_base_file())
        return self._base_sd

    def base_encoder(self):
        return self.load_encoder(self._build_base_file())

    # -- encoders ------------------------------------------------------------------------------------------------
    def _new_encoder(self, meta: dict):
        if self.cfg["layout"] == "hf":
            from transformers import CLIPVisionConfig, CLIPVisionModel

            model = CLIPVisionModel(CLIPVisionConfig.from_dict(dict(meta["vision_config"])))
            model = getattr(model, "vision_model", model)  # transformers < 5: flat keys via the inner module
        else:
            from epmq.models.sources import build_openclip_visual

            cfg = dict(meta["openclip_config"])  # QuickGELU unless the config says otherwise (OpenAI's weights)
            model = build_openclip_visual(cfg, quick_gelu=bool(cfg.get("quick_gelu", True)))
        return model.eval()

    def new_encoder(self):
        """A vision encoder of the base's architecture (random weights); reads ``base.json`` (built if needed)."""
        return self._new_encoder(self.base_meta())

    def _strict_load(self, model, sd: Mapping, who: str):
        ref = model.state_dict()
        absent, extra = [k for k in ref if k not in sd], [k for k in sd if k not in ref]
        if absent or extra:
            raise EPMQError(f"{who}: state dict mismatch with the {self.cfg['layout']} encoder "
                            f"(missing {absent[:3]}, unexpected {extra[:3]})")
        for k, v in ref.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise EPMQError(f"{who}: key '{k}' has shape {tuple(sd[k].shape)}, the encoder has {tuple(v.shape)}")
        model.load_state_dict(dict(sd), strict=True)
        return model.eval()

    def _canonical(self, sd: Mapping) -> dict:
        from epmq.models.sources import clip_vision_keys, openclip_visual_keys

        return clip_vision_keys(sd) if self.cfg["layout"] == "hf" else openclip_visual_keys(sd)

    def load_encoder(self, weights):
        """A new encoder (eval mode) holding ``weights``: a safetensors path or a state dict (strict)."""
        from epmq.models.sources import load_state_dict

        if isinstance(weights, (str, Path)):
            who, sd = str(weights), load_state_dict(weights)
        elif isinstance(weights, Mapping):
            who, sd = "state dict", dict(weights)
        else:
            raise EPMQError(f"load_encoder: expected a path or a state dict, got {type(weights).__name__}")
        return self._strict_load(self.new_encoder(), self._canonical(sd), who)


    # -- heads ---------------------------------------------------------------------------------------------------
    def _head_meta(self, task: str, base: dict) -> dict:
        from epmq.tasks.heads import head_meta

        return head_meta(self.cfg["base"], get_task(task), revision=base.get("revision"),
                         logit_scale=base["logit_scale"], format=FORMAT_VERSION)

    def _build_heads(self, tasks) -> None:
        from epmq.tasks.heads import cached_head, hf_clip_text_encoder, zeroshot_head

        base = self.base_meta()
        text = {}

        def builder(task):
            def build():
                if not text:  # the base's text tower and tokenizer (at base.json's commit), once for all heads
                    folder = self._resolve_model(self.cfg["base"], revision=base.get("revision"))
                    text["enc"] = hf_clip_text_encoder(folder, device=self.device())
                encode_text, tokenize = text["enc"]
                return zeroshot_head(encode_text, tokenize, get_task(task), logit_scale=float(base["logit_scale"]))

            return build

        for t in tasks:
            cached_head(self.head_path(t), builder(t), self._head_meta(t, base))

    def head(self, task: str):
        """The frozen zero-shot head of ``task`` (an ``nn.Module`` from encoder outputs to logits)."""
        from safetensors import safe_open

        from epmq.tasks.heads import HEAD_KEY

        self._check_task(task)
        if task not in self._heads:
            self._build_heads([task])
            with safe_open(str(self.head_path(task)), framework="pt") as f:
                weight = f.get_tensor(HEAD_KEY)
            proj = None
            if self.cfg["layout"] == "hf":
                with safe_open(str(self.projection_path), framework="pt") as f:
                    proj = f.get_tensor("weight")
            n = get_task(task).n_classes
            if weight.shape[0] != n:
                raise EPMQError(f"{self.head_path(task)}: {weight.shape[0]} rows, task {task} has {n} classes")
            h = _head_class()(weight, proj).eval()
            h.requires_grad_(False)
            self._heads[task] = h
        return self._heads[task]

    # -- experts -------------------------------------------------------------------------------------------------
    def _expert_key(self, task: str) -> dict:
        return {"source": self.expert_source(task), "base": self._base_key(), "format": FORMAT_VERSION}

    def _expert_state_dict(self, raw: Mapping, task: str, src: str) -> dict:
        from epmq.models.sources import clip_vision_keys, openclip_visual_keys

        is_openclip = any(".resblocks." in k or k.startswith("transformer.resblocks") for k in raw)
        if self.cfg["layout"] == "hf":
            if is_openclip:
                raise EPMQError(f"{task}: expert {src!r} is an open_clip state dict; use layout='open_clip'")
            return clip_vision_keys(raw)
        if is_openclip:
            return openclip_visual_keys(raw)
        proj = self.base_state_dict()["proj"]  # a HF expert: converted with the base's projection
        return hf_to_openclip_visual(clip_vision_keys(raw), proj.t())

    def _import_expert(self, folder: Path, task: str, src: str) -> dict:
        from epmq.models.sources import load_state_dict

        return self._expert_state_dict(load_state_dict(folder), task, src)

    def _expert_meta(self, task: str) -> dict:
        return {"layout": self.cfg["layout"], "n_classes": get_task(task).n_classes}

    def build_all(self) -> dict:
        out = {"base": self.build_base(), "heads": {t: self.head_path(t) for t in self.tasks}, "experts": {}}
        for t in self.tasks:
            out["experts"][t] = self.build_expert(t)
        return out

    # -- data ----------------------------------------------------------------------------------------------------
    def dataset_source(self, task: str) -> str:
        local = (self.cfg["datasets"] or {}).get(task)
        if local is not None:
            return str(local)
        t = get_task(task)
        return t.hf_dataset + (f":{t.hf_config}" if t.hf_config else "")

    def _dataset(self, task: str, which: str, *, download_mode=None):
        """The raw HF dataset of ``task``'s train (``which="train"``) or test split."""
        t = get_task(task)
        return self._hf_dataset(
            task, t.hf_dataset, t.hf_config, t.train_split if which == "train" else t.test_split,
            (t.image_column, t.label_column), name=f"'{t.hf_dataset}'", source=self.dataset_source(task),
            fetch_hint="run the suite's download step (`python -m epmq.suites.clip fetch`)",
            download_mode=download_mode)

    def _data_key(self, task: str, split: str) -> dict:
        t = get_task(task)
        key = {"source": self.dataset_source(task), "hf_split": t.test_split if split == "test" else t.train_split,
               "image_size": self.cfg["image_size"], "seed": self.seed, "format": FORMAT_VERSION}
        if split == "test":
            key["max_test"] = self.cfg["max_test"]
        else:
            key["n_val"] = self.cfg["n_val"]
            if split == "train":
                key["calib_pool"] = self.cfg["calib_pool"]
        return key

    def _build_data(self, task: str, split: str, path: Path, key: dict) -> None:
        """Decode, resize and store ``task``/``split`` as uint8 images (see :meth:`HubSuiteMixin.data_file`)."""
        from concurrent.futures import ThreadPoolExecutor

        import datasets
        import numpy as np
        import torch

        t0 = time.perf_counter()
        t = get_task(task)
        ds = self._dataset(task, "test" if split == "test" else "train")
        idx = self.split_indices(task, split, len(ds))
        sub = ds.select(idx.tolist())
        if isinstance(sub.features.get(t.image_column), datasets.Image):
            sub = sub.cast_column(t.image_column, datasets.Image(decode=False))  # decoded in worker threads
        size = self.cfg["image_size"]
        images = np.empty((len(idx), 3, size, size), dtype=np.uint8)
        labels = np.empty(len(idx), dtype=np.int64)
        chunk = 256
        workers = max(1, min(8, int(self.cfg["threads"] or os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for s in self._bar(range(0, len(idx), chunk), f"preprocess {task}/{split}",
                               total=math.ceil(len(idx) / chunk)):
                rows = sub[s:s + chunk]
                for j, arr in enumerate(pool.map(lambda v: clip_preprocess(v, size), rows[t.image_column])):
                    images[s + j] = arr
                labels[s:s + len(rows[t.label_column])] = np.asarray(rows[t.label_column], dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= t.n_classes):
            raise EPMQError(f"{task}: labels of {self.dataset_source(task)} span {labels.min()}..{labels.max()}, "
                            f"the task has {t.n_classes} classes")
        tensors = {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                   "indices": torch.from_numpy(idx)}
        save_safetensors_atomic(path, tensors, {_DATA_KEY: json.dumps(key, sort_keys=True)})
        write_json_atomic(path.with_suffix(".json"), {
            "what": "preprocessed images", "task": task, "split": split, "key": key, "n": len(idx),
            "n_source_rows": len(ds), **self._dataset_provenance(task, ds),
            "dataset_fingerprint": getattr(ds, "_fingerprint", None),
            "preprocessing": f"RGB, shorter side -> {size} (PIL bicubic), center crop {size}, uint8",
            "normalisation": {"mean": CLIP_MEAN, "std": CLIP_STD}, "seconds": time.perf_counter() - t0})

    def labels(self, task: str, split: str):
        from safetensors import safe_open

        with safe_open(str(self.data_file(task, split)), framework="pt") as f:
            return f.get_tensor("labels")

    def indices(self, task: str, split: str):
        """Source-row indices of the cached ``split`` (for provenance and disjointness checks)."""
        from safetensors import safe_open

        with safe_open(str(self.data_file(task, split)), framework="pt") as f:
            return f.get_tensor("indices")

    def calibration_batches(self, task: str, n: int, *, seed: int, batch_size: int = 32) -> list:
        """``n`` normalised images ``[b, 3, S, S]`` (float32) from the calibration pool (train minus validation),
        drawn with ``seed``; tensors as ``adapter.run`` takes them (``pixel_values`` for hf, ``x`` for open_clip)."""
        import numpy as np
        from safetensors import safe_open

        self._check_task(task)
        with safe_open(str(self.data_file(task, "train")), framework="pt") as f:
            images = f.get_tensor("images")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(images):
            raise EPMQError(f"calibration_batches({task}): n={n!r}: expected 1..{len(images)} (raise calib_pool)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EPMQError(f"calibration_batches({task}): batch_size={batch_size!r}: expected an integer >= 1")
        rng = np.random.default_rng([int(seed), zlib.crc32(task.encode()), 2])
        idx = np.sort(rng.choice(len(images), size=n, replace=False))
        x = images[idx]
        return [normalize_images(x[i:i + batch_size]) for i in range(0, n, batch_size)]

    # -- evaluation ----------------------------------------------------------------------------------------------
    def features(self, encoder, x):
        """Encoder outputs for normalised images ``x`` (what :meth:`head` takes)."""
        return encoder(pixel_values=x) if self.cfg["layout"] == "hf" else encoder(x)

    def evaluate(self, encoder, task: str, *, split: str = "test") -> dict:
        """Top-1 accuracy of ``encoder`` + ``task``'s head on ``split`` (batched, no_grad, ``precision`` autocast).
        The encoder is moved to the suite's device."""
        import torch
        from safetensors import safe_open

        self._check_task(task)
        path = self.data_file(task, split)
        dev = self.device()
        head = self.head(task).to(dev)
        was_training = encoder.training
        encoder.to(dev).eval()
        bs = self.cfg["eval_batch_size"]
        correct = 0
        with safe_open(str(path), framework="pt") as f, torch.no_grad():
            y = f.get_tensor("labels")
            images = f.get_slice("images")
            for i in self._bar(range(0, len(y), bs), f"eval {task}/{split}", total=math.ceil(len(y) / bs)):
                x = normalize_images(images[i:i + bs]).to(dev)
                with self._autocast(dev):
                    out = self.features(encoder, x)
                pred = head(out).argmax(-1).cpu()
                correct += int((pred == y[i:i + bs]).sum())
        encoder.train(was_training)
        return accuracy_record(task, split, correct, len(y))

    def evaluate_all(self, encoder, *, split: str = "test") -> dict:
        """``{"tasks": {task: record}, "mean": unweighted mean accuracy}``."""
        recs = {t: self.evaluate(encoder, t, split=split) for t in self.tasks}
        return {"tasks": recs, "mean": sum(r["accuracy"] for r in recs.values()) / len(recs)}

    # -- downloads -----------------------------------------------------------------------------------------------
    def prefetch(self, *, preprocess: bool = True) -> dict:
        """Download (or, offline, check) the base, ``base_visual``, every expert and every task's train and test
        split into the HF caches, so that later jobs need no internet. Raises ONE :class:`EPMQError` listing
        everything missing. ``preprocess`` (default: the workflow's fetch rule does it, so parallel jobs never
        race to write the same cache) also writes the ``data/`` caches."""
        problems, models = [], self.model_sources()
        revisions = {"models": self._prefetch_models(problems), "datasets": {}}
        for t in self.tasks:
            for which in ("train", "test"):
                try:
                    d = self._dataset(t, which, download_mode="reuse_cache_if_exists")
                except EPMQError as e:
                    task = get_task(t)
                    split = task.train_split if which == "train" else task.test_split
                    pinned = " (another revision than the pinned one)" if "is pinned to" in str(e) else ""
                    problems.append(f"dataset {self.dataset_source(t)} [{split}] ({t}){pinned}")
                    continue
                if self._local_dataset(t) is None:
                    revisions["datasets"][self.hub_dataset_id(t)] = dataset_commit(d)
        if problems:
            where = "offline: not in the local caches" if (hub_offline() or datasets_offline()) else "unavailable"
            raise EPMQError(f"clip suite: {len(problems)} source(s) {where}: " + "; ".join(problems)
                            + " -- run `python -m epmq.suites.clip fetch` with internet (same HF_HOME), or pass "
                            "local folders")
        if preprocess:
            for t in self.tasks:
                for split in SPLITS:
                    self.data_file(t, split)
        return {"models": models, "datasets": {t: self.dataset_source(t) for t in self.tasks},
                "revisions": revisions, "revisions_pinned": self.cfg["revisions"]}


def fetch(cache_dir, *, seed: int = 0, preprocess: bool = False, **options) -> dict:
    """Module-level :meth:`ClipSuite.prefetch` (for a workflow's download ``localrule``)."""
    return ClipSuite(cache_dir, seed=seed, **options).prefetch(preprocess=preprocess)


# --------------------------------------------------------------------------------------------- CLI


def _table(suite, base_label: str, width: int) -> str:
    """Build everything, then one row of per-task test scores for the base and one for the experts."""
    suite.build_all()
    base = suite.evaluate_all(suite.base_encoder())["tasks"]
    experts = {t: suite.evaluate(suite.expert_encoder(t), t) for t in suite.tasks}
    lines = [f"{'model':<20}" + "".join(f"{t[:width - 1]:>{width}}" for t in suite.tasks) + f"{'mean':>8}"]
    for name, recs in ((base_label, base), ("expert (own task)", experts)):
        mean = sum(r["accuracy"] for r in recs.values()) / len(recs)
        lines.append(f"{name:<20}" + "".join(f"{recs[t]['accuracy']:>{width}.2f}" for t in suite.tasks)
                     + f"{mean:>8.2f}")
    return "\n".join(lines)


def hub_suite_cli(argv, *, module: str, doc: str, name: str, suite_cls, fetch_fn, base_label: str, width: int,
                  preprocess_flag: bool) -> int:
    """``python -m epmq.suites.<module> fetch|build``, shared by the hub suites: ``fetch`` downloads (and with
    ``preprocess_flag``, ``--preprocess`` also preprocesses), ``build`` prints :func:`_table`. Errors: one line,
    exit 2."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m epmq.suites.{module}", description=doc.split("\n")[0])
    p.add_argument("command", choices=["fetch", "build"])
    p.add_argument("--cache", required=True, help="suite cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="suite option (JSON value)")
    if preprocess_flag:
        p.add_argument("--preprocess", action="store_true", help="fetch: also write the preprocessed data caches")
    a = p.parse_args(argv)
    options = parse_set_options(a.set)
    try:
        if a.command == "fetch":
            extra = {"preprocess": a.preprocess} if preprocess_flag else {}
            out = fetch_fn(a.cache, seed=a.seed, **extra, **options)
            print(f"{name}: {len(out['models'])} model source(s) and {len(out['datasets'])} dataset(s) available")
        else:
            print(_table(suite_cls(a.cache, seed=a.seed, **options), base_label, width))
        return 0
    except EPMQError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    return hub_suite_cli(argv, module="clip", doc=__doc__, name="clip", suite_cls=ClipSuite, fetch_fn=fetch,
                         base_label="zero-shot base", width=14, preprocess_flag=True)


if __name__ == "__main__":
    sys.exit(main())
