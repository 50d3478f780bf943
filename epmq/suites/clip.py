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
    read off the HF base's config. The base tower is the HF base converted (:mod:`epmq.models.convert`: q/k/v
    fused, ``proj = visual_projection.T``; OpenAI's weights are the same in both libraries), or ``base_visual``
    (a file of an open_clip state dict, e.g. the task-arithmetic ``zeroshot`` encoder converted to safetensors). Experts
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
from epmq.models.convert import hf_to_openclip_visual, openclip_config_from_hf
from epmq.models.sources import snapshot_revision
from epmq.suites._hub import DATA_KEY, HUB_DEFAULTS, HubSuite, hub_suite_cli
from epmq.suites._hub import SPLITS  # noqa: F401 -- the splits of data_file, part of this module's names
from epmq.tasks.clip import TASKS_8, get_task

#: options and their defaults (the paper's ViT-B/32 8-task setting).
DEFAULTS = {
    "base": "openai/clip-vit-base-patch32",
    "experts": "tanganke/clip-vit-base-patch32_{task}",  # format string with {task}, or {task: source}
    "layout": "hf",  # "hf" (transformers CLIPVisionModel) | "open_clip" (open_clip VisionTransformer)
    "arch": None,  # open_clip: model name (ViT-B-32) or config dict; None = read off the base's config
    "base_visual": None,  # open_clip: state-dict file of the base tower; None = converted from `base`
    "tasks": TASKS_8,
    "image_size": 224,
    "eval_batch_size": 256,
    **HUB_DEFAULTS,  # datasets, n_val, calib_pool, max_test, precision, device, threads, progress, ...
}
FORMAT_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAYOUTS = ("hf", "open_clip")
PROJECTION = "projection"  # heads/projection.safetensors


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


class ClipSuite(HubSuite):
    """The ``clip`` suite; options (constructor keywords) are listed in :data:`DEFAULTS` and the module doc."""

    name = "clip"
    format_version = FORMAT_VERSION
    DEFAULTS = DEFAULTS
    INT_OPTIONS = (("image_size", 8), ("n_val", 1), ("calib_pool", 1), ("eval_batch_size", 1))
    task_lookup = staticmethod(get_task)

    def __init__(self, cache_dir, *, seed: int = 0, **options):
        super().__init__(cache_dir, seed=seed, **options)
        self.adapter = "hf_clip_vision" if self.cfg["layout"] == "hf" else "openclip_vit"
        self._heads: dict = {}

    def check_options(self, cfg: dict) -> None:
        """``layout``, and ``arch`` / ``base_visual`` only with ``layout="open_clip"``."""
        if cfg["layout"] not in LAYOUTS:
            raise EPMQError(f"clip suite: layout={cfg['layout']!r}: expected one of {list(LAYOUTS)}")
        if cfg["layout"] == "hf" and (cfg["arch"] is not None or cfg["base_visual"] is not None):
            raise EPMQError("clip suite: arch / base_visual apply to layout='open_clip' only")

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
        self.build_base_weights()
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

    def build_base_weights(self) -> Path:
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
                "revision": snapshot_revision(folder), "revision_pinned": self.model_revision(self.cfg["base"]),
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
                meta["base_visual"] = {"source": str(self.cfg["base_visual"]), "revision": snapshot_revision(bv),
                                       "revision_pinned": self.model_revision(self.cfg["base_visual"])}
        enc = self._new_encoder(meta)
        self._strict_load(enc, sd, f"base {self.cfg['base']!r}")  # validates keys and shapes before writing
        meta["n_params"] = int(sum(v.numel() for v in sd.values()))
        meta["seconds"] = time.perf_counter() - t0
        if self.cfg["layout"] == "hf":
            save_safetensors_atomic(self.projection_path, {"weight": projection},
                                    {"source": self.cfg["base"], "revision": snapshot_revision(folder)})
            write_json_atomic(self.projection_path.with_suffix(".json"), {
                "what": "visual_projection.weight of the base (applied by every head)", "source": self.cfg["base"],
                "revision": snapshot_revision(folder), "shape": list(projection.shape)})
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
        path = self.build_base_weights()
        self._build_heads(self.tasks)
        return path

    def base_state_dict(self) -> dict:
        if self._base_sd is None:
            from epmq.models.sources import load_state_dict

            self._base_sd = load_state_dict(self.build_base_weights())
        return self._base_sd

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

    # -- data ----------------------------------------------------------------------------------------------------
    def hf_split(self, task: str, which: str) -> str:
        """The hub split of ``task`` read for ``which``: its ``test_split`` for ``"test"``, else its ``train_split``."""
        t = get_task(task)
        return t.test_split if which == "test" else t.train_split

    def dataset_columns(self, task: str) -> tuple[str, ...]:
        """The columns ``task``'s dataset must have: its image and label columns."""
        t = get_task(task)
        return t.image_column, t.label_column

    def _data_key(self, task: str, split: str) -> dict:
        return {"source": self.dataset_source(task), "hf_split": self.hf_split(task, split),
                "image_size": self.cfg["image_size"], "seed": self.seed, "format": FORMAT_VERSION,
                **self.split_key(split)}

    def _build_data(self, task: str, split: str, path: Path, key: dict) -> None:
        """Decode, resize and store ``task``/``split`` as uint8 images (see :meth:`HubSuite.data_file`)."""
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
        save_safetensors_atomic(path, tensors, {DATA_KEY: json.dumps(key, sort_keys=True)})
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


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    return hub_suite_cli(ClipSuite, argv, doc=__doc__, base_label="zero-shot base", width=14, preprocess_flag=True)


if __name__ == "__main__":
    sys.exit(main())
