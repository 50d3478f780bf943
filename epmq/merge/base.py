"""What every merge method shares: the :class:`MergeMethod` record, task vectors and per-tensor seeds.

A merge method is a pure tensor function on one tensor name at a time (mergekit's shape)::

    fn(base, experts, **hparams) -> merged        # float32, shape of the inputs

with ``base`` = θ₀ (None for methods that need no base) and ``experts`` = [θ₁ … θ_T], all of one shape.
Task vectors are τ_t = θ_t − θ₀, computed in float32 and optionally DARE-sparsified.

A few methods need a statistic of the whole model before any tensor can be merged (TIES with global
trimming needs one magnitude threshold per task). They declare a ``prepare`` pass, which the driver
(:func:`epmq.merge.merge_state_dicts`) runs first, streaming the model tensor by tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from epmq.errors import EPMQError, check_shape
from epmq.merge.dare import dare

if TYPE_CHECKING:
    import torch

    #: ``load(key) -> (base tensor or None, [expert tensors])``, validated, one key at a time.
    Loader = Callable[[str], tuple[torch.Tensor | None, list[torch.Tensor]]]


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
            before merging; it may add internal hyperparameters (e.g. TIES' global ``thresholds``).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    prepare: Callable[[Loader, Sequence[str], dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))  # read-only


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


def task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, dare_p: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    """Task vectors τ_t = θ_t − θ₀ in float32, DARE-sparsified with drop probability ``dare_p``.

    Task t's drop mask is drawn with seed ``mix_seed(seed, t)``.
    """
    if base is None:
        raise EPMQError("base: None, but task vectors need the pretrained tensor θ₀")
    check_experts(experts, base.shape)
    base = base.float()
    return [dare(expert.float() - base, dare_p, mix_seed(seed, t)) for t, expert in enumerate(experts)]


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise EPMQError(f"{name}={value!r}: expected one of {list(choices)}")
    return value
