"""The suite skeleton: what a benchmark suite provides to the workflow, and the parts every suite shares.

A suite is a base encoder, one expert per task, frozen per-task heads, calibration batches from each task's
train split, and evaluation on its test split. Every artefact is a file under the suite's cache folder
(safetensors + JSON metadata with seed, steps and data versions), written atomically, so that pretraining and
fine-tuning run once. A suite is registered in :data:`epmq.suites.SUITES` by name.

The merged and quantized objects are always the *encoder* (the module an adapter of
:mod:`epmq.models.adapters` recognises); heads stay in full precision, one per task, and are never merged.
A text-to-text suite (``t5-glue``) has no heads: its "encoder" is the whole seq2seq model, whose own LM head
generates the answers, :attr:`Suite.has_heads` is False and :meth:`Suite.head` returns None.

What a suite provides (a subclass of :class:`Suite`)
    * class attributes ``name``, ``adapter`` (a name in :data:`epmq.models.adapters.ADAPTERS`), ``DEFAULTS``
      (every constructor option with its default), and where they differ from the defaults here
      ``has_heads`` and ``merge_exclude``; ``self.tasks`` (set by its constructor, from the options);
    * models: :meth:`~Suite.new_encoder`, :meth:`~Suite.load_encoder`, :meth:`~Suite.build_base_weights` (the
      base's weights alone), :meth:`~Suite.build_base` (the base and every head), :meth:`~Suite.build_expert`,
      :meth:`~Suite.head`;
    * data: :meth:`~Suite.calibration_batches`, and optionally :meth:`~Suite.prefetch` (downloads);
    * evaluation: :meth:`~Suite.evaluate` -- ONE task's record (its batches, its forward, its metric).

What every suite gets from here
    the cache layout (``base_path``, ``head_path``, ``expert_path``, ``splits_path``), the option check
    (:meth:`~Suite.with_defaults`), :meth:`~Suite.base_encoder` / :meth:`~Suite.expert_encoder`,
    :meth:`~Suite.build_all`, and the evaluation loop :meth:`~Suite.evaluate_all`: every task of
    ``self.tasks`` in order through :meth:`~Suite.evaluate`, plus their unweighted mean
    (:func:`mean_accuracy`). The hub-backed suites (``clip``, ``t5-glue``) share more -- revisions, downloads,
    seeded splits, the preprocessed-data cache, a small CLI -- in :class:`epmq.suites._hub.HubSuite`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from epmq.errors import EPMQError
from epmq.suites._splits import FILENAME as SPLITS_FILENAME


class Suite(ABC):
    """A benchmark suite. Subclasses set ``name``, ``adapter``, ``DEFAULTS`` and ``tasks`` and implement the
    abstract methods (the module doc lists them)."""

    name: str
    tasks: tuple[str, ...]
    adapter: str  # name in epmq.models.adapters.ADAPTERS
    #: every constructor option with its default (:meth:`with_defaults` refuses any other)
    DEFAULTS: dict = {}
    #: False for a suite without per-task heads (text-to-text): :meth:`head` returns None, no heads/ files
    has_heads: bool = True
    #: regexes of state-dict keys the merge copies from the base; None: epmq.merge.driver.DEFAULT_EXCLUDE
    merge_exclude: tuple[str, ...] | None = None

    def __init__(self, cache_dir: str | Path, *, seed: int = 0, **options):
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.options = options

    def with_defaults(self, options: dict) -> dict:
        """``DEFAULTS`` updated with ``options``; one error naming any option the suite does not have."""
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise EPMQError(f"{self.name} suite: unknown option(s) {unknown}; expected some of {sorted(self.DEFAULTS)}")
        return {**self.DEFAULTS, **options}

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
    def build_base_weights(self) -> Path:
        """Create (or find cached) the base encoder's safetensors alone (no heads); return its path."""

    @abstractmethod
    def build_base(self) -> Path:
        """Create (or find cached) the base encoder's safetensors *and every task's head*; return the base's
        path. Expert jobs run after it in parallel then never build a head concurrently."""

    @abstractmethod
    def build_expert(self, task: str) -> Path:
        """Fine-tune / import (or find cached) the expert encoder for ``task``; return its safetensors path."""

    def base_encoder(self):
        """The base encoder (built if missing), in eval mode."""
        return self.load_encoder(self.build_base_weights())

    def expert_encoder(self, task: str):
        """``task``'s expert encoder (built if missing), in eval mode."""
        return self.load_encoder(self.build_expert(task))

    def build_all(self) -> dict:
        """Base, every head and every expert (cached); their paths ``{"base": path, "heads": {task: path},
        "experts": {task: path}}`` (no ``"heads"`` without heads)."""
        out = {"base": self.build_base()}
        if self.has_heads:
            out["heads"] = {t: self.head_path(t) for t in self.tasks}
        out["experts"] = {t: self.build_expert(t) for t in self.tasks}
        return out

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
        """The record of ``encoder`` (+ ``task``'s head) on ``split``: ``{"task", "split", "n", "correct",
        "accuracy", "stderr"}`` (:func:`epmq.evaluate.accuracy_record`; ``accuracy`` in %, the task's headline
        metric) plus whatever the suite adds; the encoder's train/eval mode is left as it was."""

    def evaluate_all(self, encoder, *, split: str = "test") -> dict:
        """The one evaluation loop of every suite: ``{"tasks": {task: evaluate(...)}, "mean": unweighted mean
        accuracy}``, the tasks evaluated one after the other in ``self.tasks`` order."""
        recs = {t: self.evaluate(encoder, t, split=split) for t in self.tasks}
        return {"tasks": recs, "mean": mean_accuracy(recs)}


def load_checked(model, sd, who: str, *, ignore=lambda key: False):
    """``sd`` loaded into ``model`` (eval mode) after checking, in one line naming ``who``, that its keys are the
    model's (keys for which ``ignore(key)`` holds may be absent or extra) and every shape matches: a damaged
    or foreign checkpoint is named, never half-loaded or reported as torch's multi-line error."""
    ref = model.state_dict()
    absent = [k for k in ref if k not in sd and not ignore(k)]
    extra = [k for k in sd if k not in ref and not ignore(k)]
    if absent or extra:
        raise EPMQError(f"{who}: state dict mismatch (missing {absent[:3]}, unexpected {extra[:3]})")
    for k, v in ref.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise EPMQError(f"{who}: key '{k}' has shape {tuple(sd[k].shape)}, the encoder has {tuple(v.shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in ref}, strict=False)
    return model.eval()


def mean_accuracy(recs: dict) -> float:
    """The unweighted mean of the records' ``accuracy`` (summed left to right in the records' order)."""
    return sum(r["accuracy"] for r in recs.values()) / len(recs)


def train_step(loss, opt, sched, params, *, max_norm: float = 1.0) -> float:
    """One optimizer step of a suite's fine-tuning loop: backward of ``loss`` (gradients cleared first), gradient
    norm of ``params`` clipped to ``max_norm``, ``opt`` then ``sched`` stepped; returns the loss as a float."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()
    return float(loss.detach())


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
