"""What the hub-backed suites (``clip``, ``t5-glue``) share: :class:`HubSuite`, their option checks, hub
revisions, downloads and a small command line.

A hub suite reads its base, its experts and its datasets from the Hugging Face hub (or local folders), once,
in :meth:`HubSuite.prefetch` (the workflow's fetch rule; offline it only checks the caches). It supplies, on
top of :class:`epmq.suites.base.Suite`:

* ``DEFAULTS``: ``base``, ``experts``, ``tasks`` and its own options, plus :data:`HUB_DEFAULTS` (``datasets``,
  ``n_val``, ``calib_pool``, ``max_test``, ``precision``, ``device``, ``threads``, ...); ``INT_OPTIONS`` (the
  integer options and their lowest values), ``format_version``, ``task_lookup`` (the task registry's lookup,
  e.g. :func:`epmq.tasks.clip.get_task`) and :meth:`HubSuite.check_options` for its own options;
* ``model_sources()`` (every model source, base first), ``hf_split(task, which)`` (the hub split read for
  ``which`` = ``"train"`` | ``"test"``) and ``dataset_columns(task)`` (the columns its dataset must have);
* the expert import: ``_expert_key(task)``, ``_import_expert(folder, task, source)``, ``_expert_meta(task)``
  (:meth:`HubSuite.build_expert` does the rest);
* the data cache: ``_data_key(task, split)`` (its source fields + :meth:`HubSuite.split_key`) and
  ``_build_data(task, split, path, key)`` (:meth:`HubSuite.data_file` calls it once per split).

Everything else -- revisions and their pins (``revisions={"models": {hub id: rev}, "datasets": {hub id: rev}}``,
see :mod:`epmq.suites.clip`, "Revisions"), the seeded validation / calibration-pool / test splits, the
preprocessed-data cache check, expert import with its provenance, the device and the progress bars -- is here.

:func:`hub_suite_cli` is each hub suite's ``python -m epmq.suites.<module> fetch|build``.
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
from epmq.io import save_safetensors_atomic, write_json_atomic
from epmq.io import stderr_isatty as _isatty
from epmq.models.sources import snapshot_revision
from epmq.suites.base import Suite, mean_accuracy, parse_set_options

#: the cached splits of a hub suite: the reported ``test``, ``validation`` (merge selection) and ``train``
#: (the calibration pool, disjoint from validation)
SPLITS = ("test", "validation", "train")
#: the precisions a hub suite evaluates in (the names of epmq.precision.DTYPES)
PRECISIONS = ("fp32", "bf16", "fp16")
#: the options every hub suite has, with their defaults (each suite's ``DEFAULTS`` adds its own)
HUB_DEFAULTS = {
    "datasets": None,  # {task: local save_to_disk folder (the hub's schema and split names)} overriding the hub
    "n_val": 256,  # validation rows carved from train (seeded)
    "calib_pool": 1024,  # train rows (disjoint from validation) prepared once for calibration draws
    "max_test": None,  # cap on each reported split (None: all)
    "precision": "fp32",  # evaluation autocast: fp32 | bf16 | fp16
    "device": "auto",
    "threads": None,
    "progress": None,  # None: when stderr is a TTY
    "data_dir": None,  # datasets cache_dir (None: the HF datasets cache)
    "revisions": None,  # {"models": {hub id: revision}, "datasets": {hub id: revision}}; None: unpinned
}
#: the safetensors metadata key of a data cache file: the JSON of the key it was built with (``_data_key``)
DATA_KEY = "epmq_data"


def _env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value (1, on, yes, true)."""
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


def dataset_commit(ds) -> str | None:
    """The hub commit a ``datasets`` split was built from: the ``<hash>`` folder of its Arrow cache files
    (``<cache>/<owner>___<name>/<config>/<version>/<hash>/``, where hub datasets use the commit SHA), else None."""
    from epmq.models.sources import is_commit

    for f in getattr(ds, "cache_files", None) or ():
        name = Path(f.get("filename", "")).parent.name
        return name if is_commit(name) else None
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (for one-line errors)."""
    return (str(e).strip().splitlines() or [""])[0][:200]


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


class HubSuite(Suite):
    """A hub-backed suite (the module doc lists what a subclass supplies): the shared constructor, revisions,
    downloads (:meth:`prefetch`), seeded splits, the preprocessed-data cache and the expert import."""

    format_version: int
    #: ``(option, lowest value)`` of the suite's integer options
    INT_OPTIONS: tuple[tuple[str, int], ...] = ()
    #: the task registry's lookup (``task_lookup(name).name`` is the registry's spelling)
    task_lookup = None

    def __init__(self, cache_dir, *, seed: int = 0, **options):
        cfg = self.with_defaults(options)
        super().__init__(cache_dir, seed=seed, **options)
        who = f"{self.name} suite"
        if cfg["precision"] not in PRECISIONS:
            raise EPMQError(f"{who}: precision={cfg['precision']!r}: expected one of {list(PRECISIONS)}")
        self.check_options(cfg)
        self.tasks = check_hub_options(cfg, who, type(self).task_lookup, self.INT_OPTIONS)
        self.cfg = cfg
        self._check_revisions(who)
        self._base_sd = None
        self._device_cache = None
        if cfg["threads"]:
            import torch

            torch.set_num_threads(int(cfg["threads"]))

    def check_options(self, cfg: dict) -> None:
        """The suite's own option checks (one :class:`EPMQError` naming the option); the default has none."""

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
                out[s] = snapshot_revision(resolve(s, revision=self.model_revision(s)))
            except EPMQError as e:
                if not hub_offline():
                    problems.append(f"model {s} ({first_line(e)[:120]})")
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
        The suite supplies ``_expert_key``, ``build_base_weights``,
        ``_import_expert(folder, task, source)`` (the expert's state dict in the base's keys) and
        ``_expert_meta(task)`` (its own metadata fields)."""
        self._check_task(task)
        path = self.expert_path(task)
        key = self._expert_key(task)
        meta = self._read_json(path.with_suffix(".json"))
        self.build_base_weights()
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
                "revision": snapshot_revision(folder), "revision_pinned": self.model_revision(src),
                "base": self.cfg["base"], **self._expert_meta(task),
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

    def _data_cached(self, path: Path, key: dict) -> bool:
        from safetensors import safe_open

        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get(DATA_KEY) == json.dumps(key, sort_keys=True)
        except Exception:  # noqa: BLE001 -- unreadable: rebuilt
            return False

    def hub_dataset_id(self, task: str) -> str:
        """The hub dataset ``task`` reads unless given a local folder (its task registry's ``hf_dataset``)."""
        return type(self).task_lookup(task).hf_dataset

    def dataset_source(self, task: str) -> str:
        """Where ``task``'s data comes from: its local ``datasets`` folder, else ``<hub id>[:<config>]``."""
        local = self._local_dataset(task)
        if local is not None:
            return str(local)
        t = type(self).task_lookup(task)
        return t.hf_dataset + (f":{t.hf_config}" if t.hf_config else "")

    def _dataset(self, task: str, which: str, *, download_mode=None):
        """The raw dataset of ``task``'s reported split (``which="test"``) or its train split (:meth:`hf_split`):
        from ``cfg["datasets"][task]`` (a ``save_to_disk`` folder) when given, else from the hub at the pinned
        revision (offline mode unless the caller downloads), with the suite's ``dataset_columns(task)``
        checked. Every failure is one ``EPMQError`` line naming the task and saying how to fetch the data. A
        hub split built from another commit than a pinned one is refused."""
        import datasets

        from epmq.models.sources import is_commit

        t = type(self).task_lookup(task)
        hf_dataset, hf_config, split = t.hf_dataset, t.hf_config, self.hf_split(task, which)
        name = f"'{hf_dataset}'" + (f" ({hf_config})" if hf_config else "")
        fetch_hint = f"run `{self.fetch_command()}`"
        local = self._local_dataset(task)
        if local is not None:
            try:
                d = datasets.load_from_disk(str(local))
            except Exception as e:  # noqa: BLE001 -- FileNotFoundError, corrupt folder, ...
                raise EPMQError(f"{task}: cannot read local dataset {local} ({type(e).__name__}: "
                                f"{first_line(e)})") from e
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
                                f"{first_line(e)}); {fetch_hint} on a machine with internet, or pass "
                                "datasets={task: folder}") from e
            got = dataset_commit(d)
            if is_commit(pin) and got != pin:
                raise EPMQError(f"{task}: dataset {name} split {split!r} is pinned to revision {pin} but `datasets` "
                                f"loaded {got or 'a split of unknown revision'} (offline it takes the latest cached "
                                f"revision, whatever is asked): {fetch_hint} with internet, or remove the other "
                                "revision from the datasets cache")
        for col in self.dataset_columns(task):
            if col not in d.column_names:
                raise EPMQError(f"{task}: dataset {self.dataset_source(task)} [{split}] has no column {col!r} "
                                f"(columns {d.column_names})")
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

    def fetch_command(self) -> str:
        """The command that downloads this suite's sources (what an offline error tells the user to run)."""
        return f"python -m {_module(self.name)} fetch"

    def split_key(self, split: str) -> dict:
        """The size options a cached ``split`` depends on: the tail of every hub suite's ``_data_key``."""
        if split == "test":
            return {"max_test": self.cfg["max_test"]}
        key = {"n_val": self.cfg["n_val"]}
        if split == "train":
            key["calib_pool"] = self.cfg["calib_pool"]
        return key

    # -- downloads -------------------------------------------------------------------------------------------
    def prefetch(self, *, preprocess: bool = True) -> dict:
        """Download (or, offline, check) every model source and every task's train and reported split into the
        HF caches, so that later jobs need no internet; raises ONE :class:`EPMQError` listing everything
        missing. ``preprocess`` (the workflow's fetch rule does it, so parallel jobs never race to write the
        same cache) also writes the ``data/`` caches."""
        problems, models = [], self.model_sources()
        revisions = {"models": self._prefetch_models(problems), "datasets": {}}
        for t in self.tasks:
            for which in ("train", "test"):
                try:
                    d = self._dataset(t, which, download_mode="reuse_cache_if_exists")
                except EPMQError as e:
                    problems.append(f"dataset {self.dataset_source(t)} [{self.hf_split(t, which)}] ({t}){_why(e)}")
                    continue
                if self._local_dataset(t) is None:
                    revisions["datasets"][self.hub_dataset_id(t)] = dataset_commit(d)
        if problems:
            where = "offline: not in the local caches" if (hub_offline() or datasets_offline()) else "unavailable"
            raise EPMQError(f"{self.name} suite: {len(problems)} source(s) {where}: " + "; ".join(problems)
                            + f" -- run `{self.fetch_command()}` with internet (same HF_HOME), "
                            "or pass local folders")
        if preprocess:
            for t in self.tasks:
                for split in SPLITS:
                    self.data_file(t, split)
        return {"models": models, "datasets": {t: self.dataset_source(t) for t in self.tasks},
                "revisions": revisions, "revisions_pinned": self.cfg["revisions"]}


def _module(suite_name: str) -> str:
    """The module of suite ``suite_name`` as registered in :data:`epmq.suites.SUITES` (also when it runs as
    ``__main__``)."""
    from epmq.suites import SUITES

    return SUITES[suite_name].split(":")[0]


def _why(e: EPMQError) -> str:
    """Why a dataset is missing, for :meth:`HubSuite.prefetch`'s list: nothing when it is just not cached."""
    msg = str(e)
    if "is pinned to" in msg:
        return " (another revision than the pinned one)"
    if "offline" in msg or "could not be loaded" in msg:
        return ""
    return f" ({first_line(e)[:120]})"


# --------------------------------------------------------------------------------------------- CLI


def _table(suite: HubSuite, base_label: str, width: int) -> str:
    """Build everything, then one row of per-task test scores for the base and one for the experts."""
    suite.build_all()
    base = suite.evaluate_all(suite.base_encoder())["tasks"]
    experts = {t: suite.evaluate(suite.expert_encoder(t), t) for t in suite.tasks}
    lines = [f"{'model':<20}" + "".join(f"{t[:width - 1]:>{width}}" for t in suite.tasks) + f"{'mean':>8}"]
    for name, recs in ((base_label, base), ("expert (own task)", experts)):
        lines.append(f"{name:<20}" + "".join(f"{recs[t]['accuracy']:>{width}.2f}" for t in suite.tasks)
                     + f"{mean_accuracy(recs):>8.2f}")
    return "\n".join(lines)


def hub_suite_cli(suite_cls, argv, *, doc: str, base_label: str, width: int, preprocess_flag: bool) -> int:
    """``python -m epmq.suites.<module> fetch|build`` of a hub suite: ``fetch`` downloads (with
    ``preprocess_flag`` only ``--preprocess`` also preprocesses; without it, it always does), ``build`` builds
    everything and prints the base-vs-experts table. Errors: one line, exit 2."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {_module(suite_cls.name)}", description=doc.split("\n")[0])
    p.add_argument("command", choices=["fetch", "build"])
    p.add_argument("--cache", required=True, help="suite cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="suite option (JSON value)")
    if preprocess_flag:
        p.add_argument("--preprocess", action="store_true", help="fetch: also write the preprocessed data caches")
    a = p.parse_args(argv)
    try:
        suite = suite_cls(a.cache, seed=a.seed, **parse_set_options(a.set))
        if a.command == "fetch":
            out = suite.prefetch(preprocess=a.preprocess if preprocess_flag else True)
            print(f"{suite.name}: {len(out['models'])} model source(s) and {len(out['datasets'])} dataset(s) "
                  "available")
        else:
            print(_table(suite, base_label, width))
        return 0
    except EPMQError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
