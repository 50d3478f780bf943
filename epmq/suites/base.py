"""What a benchmark suite provides to the workflow: a base encoder, one expert per task, frozen per-task heads,
calibration batches from each task's train split, and evaluation on its test split.

Every artefact is a file under the suite's cache folder (safetensors + JSON metadata with seed, steps and
data versions), written atomically, so that pretraining and fine-tuning run once. A suite is registered in
:data:`epmq.suites.SUITES` by name.

The merged and quantized objects are always the *encoder* (the module an adapter of
:mod:`epmq.models.adapters` recognises); heads stay in full precision, one per task, and are never merged.
A text-to-text suite (``t5-glue``) has no heads: its "encoder" is the whole seq2seq model, whose own LM head
generates the answers, and :meth:`Suite.head` returns None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from epmq.errors import EPMQError
from epmq.suites._splits import FILENAME as SPLITS_FILENAME


class Suite(ABC):
    """A benchmark suite. Subclasses set ``name``, ``tasks`` and ``adapter`` and implement the methods."""

    name: str
    tasks: tuple[str, ...]
    adapter: str  # name in epmq.models.adapters.ADAPTERS
    #: regexes of state-dict keys the merge copies from the base; None: epmq.merge.driver.DEFAULT_EXCLUDE
    merge_exclude: tuple[str, ...] | None = None

    def __init__(self, cache_dir: str | Path, *, seed: int = 0, **options):
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.options = options

    # -- cache layout (the same for every suite, so a workflow declares the files with one pattern) --------
    # {cache}/base.safetensors, {cache}/heads/<task>.safetensors, {cache}/experts/<task>.safetensors, each
    # with its metadata next to it: path.with_suffix(".json").
    @property
    def base_path(self) -> Path:
        """``{cache}/base.safetensors``."""
        return self.cache_dir / "base.safetensors"

    def head_path(self, task: str) -> Path:
        """``{cache}/heads/<task>.safetensors`` (a task of this suite, else an error naming it)."""
        return self.cache_dir / "heads" / f"{self._check_task(task)}.safetensors"

    def expert_path(self, task: str) -> Path:
        """``{cache}/experts/<task>.safetensors`` (a task of this suite, else an error naming it)."""
        return self.cache_dir / "experts" / f"{self._check_task(task)}.safetensors"

    @property
    def splits_path(self) -> Path:
        """``{cache}/splits.safetensors``: the split cache an embedded suite's :meth:`build_base` writes
        (:mod:`epmq.suites._splits`)."""
        return self.cache_dir / SPLITS_FILENAME

    def _check_task(self, task: str) -> str:
        """``task`` when it is one of this suite's tasks; else one clear error naming it."""
        if task not in self.tasks:
            raise EPMQError(f"task={task!r}: not a task of the {self.name} suite (tasks: {list(self.tasks)})")
        return task

    # -- sources ------------------------------------------------------------------------------------------
    def prefetch(self) -> dict:
        """Download / install (or, offline, check) everything later jobs read -- models, data -- and return a
        JSON-able summary. The workflow runs it as a local rule, so cluster jobs never need internet. Raises
        one :class:`~epmq.errors.EPMQError` naming what is missing. The default has nothing to fetch."""
        return {}

    # -- models -------------------------------------------------------------------------------------------
    @abstractmethod
    def new_encoder(self):
        """A freshly built encoder with this suite's architecture (weights arbitrary)."""

    @abstractmethod
    def load_encoder(self, weights):
        """An encoder in eval mode holding ``weights`` (a safetensors path or a state dict)."""

    @abstractmethod
    def build_base(self) -> Path:
        """Create (or find cached) the base encoder's safetensors *and every task's head*; return the base's
        path. Expert jobs run after it in parallel then never build a head concurrently."""

    @abstractmethod
    def build_expert(self, task: str) -> Path:
        """Fine-tune (or find cached) the expert encoder for ``task``; return its safetensors path."""

    @abstractmethod
    def head(self, task: str):
        """The frozen head of ``task`` (an ``nn.Module`` mapping encoder outputs to class logits), or None for a
        suite without heads (text-to-text)."""

    # -- data ---------------------------------------------------------------------------------------------
    @abstractmethod
    def calibration_batches(self, task: str, n: int, *, seed: int, batch_size: int = 32) -> list:
        """``n`` examples from ``task``'s train split as encoder-ready batches (what ``adapter.run`` takes)."""

    @abstractmethod
    def evaluate(self, encoder, task: str, *, split: str = "test") -> dict:
        """Top-1 accuracy of ``encoder`` + ``task``'s head on ``split``:
        ``{"task", "split", "n", "correct", "accuracy", "stderr"}`` (stderr = sqrt(p(1-p)/n))."""

    @abstractmethod
    def evaluate_all(self, encoder, *, split: str = "test") -> dict:
        """``{"tasks": {task: evaluate(...)}, "mean": unweighted mean accuracy over the tasks}``."""


def parse_set_options(pairs) -> dict:
    """Suite options from a suite CLI's repeated ``--set KEY=VALUE``: each value read as JSON (numbers,
    booleans, lists), else kept as the string."""
    import json

    options = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    return options
