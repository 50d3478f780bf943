"""What every merge method shares: the :class:`MergeMethod` record, task vectors and per-tensor seeds.

A merge method is a pure tensor function on one tensor name at a time (mergekit's shape)::

    fn(base, experts, **hparams) -> merged        # float32, shape of the inputs

with ``base`` = θ₀ (None for methods that need no base) and ``experts`` = [θ₁ … θ_T], all of one shape.
``experts`` is any sequence: the driver passes one that reads each expert's tensor from its (lazy) state dict
when it is accessed and keeps none, so a method that goes through it once, in order (:func:`iter_experts`,
:func:`iter_task_vectors`), holds one expert tensor at a time and reads each once.
Task vectors are τ_t = θ_t − θ₀, computed in float32 and optionally DARE-sparsified.

A few methods need a statistic of the whole model before any tensor can be merged (TIES with global
trimming needs one magnitude threshold per task). They declare a ``prepare`` pass, which the driver
(:func:`epmq.merge.merge_state_dicts`) runs first, streaming the model tensor by tensor.

Data-aware merges (RegMean, feature calibration) also read calibration data: they set
``needs_calibration=True`` and their ``prepare`` pass gets a fourth argument, a :class:`MergeData` (the train
split's calibration batches per task, a factory of fresh models of the architecture and its adapter), from
which it computes what its tensor function needs (e.g. per-layer input Grams, into the hyperparameters it
returns). The workflow gives such a merge the calibration file of the first calibration seed.

A method is declared once, in its own module, beside its tensor function (``AVERAGE`` in
:mod:`epmq.merge.average`, ...), with its display ``label``; :mod:`epmq.merge.registry` lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from epmq.errors import EPMQError, check_shape
from epmq.merge.dare import dare

if TYPE_CHECKING:
    import torch

    #: ``load(key) -> (base tensor or None, expert tensors)``, validated, one key at a time; the experts are a
    #: sequence the driver reads each tensor of on access (go through it once)
    Loader = Callable[[str], tuple[torch.Tensor | None, Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry key, e.g. ``"ties"``.
        fn: the tensor function ``fn(base, experts, **hparams) -> float32 tensor``.
        paper: title and arXiv link of the method's paper.
        description: one line: what it computes.
        defaults: every hyperparameter ``fn`` accepts from a user, with its default value. A ``seed``
            hyperparameter is re-derived per tensor key by the driver (:func:`mix_seed`), so each tensor
            gets its own, visiting-order-independent random stream.
        needs_base: whether θ₀ is required (False only for plain averaging).
        prepare: optional whole-model pass ``prepare(load, keys, hparams) -> hparams`` run by the driver
            before merging; it may add internal hyperparameters (e.g. TIES' global ``thresholds``). For a
            method with ``needs_calibration``: ``prepare(load, keys, hparams, data)`` (a :class:`MergeData`).
        label: the name tables and figures show (default: ``name``).
        needs_calibration: whether the method reads calibration data (``prepare`` gets a :class:`MergeData`).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    prepare: Callable[..., dict[str, Any]] | None = None
    label: str = ""
    needs_calibration: bool = False

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))  # read-only
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if self.needs_calibration and self.prepare is None:
            raise EPMQError(f"merge method {self.name}: needs_calibration without a prepare pass to read the data")


@dataclass(frozen=True)
class MergeData:
    """What a data-aware merge reads besides the checkpoints.

    Attributes:
        calib: per task (the experts' order), its calibration batches from the train split (never test).
        new_model: ``new_model()`` -> a fresh model of the suite's architecture (load a state dict into it).
        adapter: the architecture's :class:`epmq.models.adapters.Adapter` (run a batch, find the Linears).
        device: where to run forwards.
    """

    calib: Sequence[Sequence[Any]]
    new_model: Callable[[], Any]
    adapter: Any
    device: Any = None


def mix_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (e.g. a tensor key, a task index), stable across runs."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_experts(experts: Sequence[torch.Tensor], shape=None) -> None:
    """At least one expert, each of ``shape`` (default: the first expert's shape)."""
    if len(experts) == 0:
        raise EPMQError("experts: empty list, expected at least one expert tensor")
    shape = experts[0].shape if shape is None else shape
    for t, expert in enumerate(experts):
        check_shape(expert, shape, f"expert {t}")


def iter_experts(experts: Sequence[torch.Tensor], shape=None) -> Iterator[torch.Tensor]:
    """The experts in order, each checked to have ``shape`` (default: the first one's) as it comes: one pass
    over ``experts``, so a sequence that reads each tensor on access (the driver's) holds one at a time."""
    if len(experts) == 0:
        raise EPMQError("experts: empty list, expected at least one expert tensor")
    t = 0
    for expert in experts:  # (enumerate() would keep the previous item alive while the next one is read)
        shape = expert.shape if shape is None else shape
        yield check_shape(expert, shape, f"expert {t}")
        del expert
        t += 1


def iter_task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, dare_p: float = 0.0, seed: int = 0
) -> Iterator[torch.Tensor]:
    """:func:`task_vectors` one at a time, in task order, in one pass over ``experts``."""
    if base is None:
        raise EPMQError("base: None, but task vectors need the pretrained tensor θ₀")
    base = base.float()
    t = 0
    for expert in iter_experts(experts, base.shape):
        tau = dare(expert.float() - base, dare_p, mix_seed(seed, t))
        del expert
        yield tau
        del tau
        t += 1


def task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, dare_p: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    """Task vectors τ_t = θ_t − θ₀ in float32, DARE-sparsified with drop probability ``dare_p``.

    Task t's drop mask is drawn with seed ``mix_seed(seed, t)``.
    """
    return list(iter_task_vectors(base, experts, dare_p=dare_p, seed=seed))


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise EPMQError(f"{name}={value!r}: expected one of {list(choices)}")
    return value
