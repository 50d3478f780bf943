"""The registry of merge methods, ``METHODS``: name -> :class:`~epmq.merge.base.MergeMethod`, in table order.

Each method is declared in its own module beside its tensor function; adding one is a module and a line here
(and its name in the config schema's ``merges.*.method`` enum: a test keeps the two equal). ``dare_task_arithmetic``
and ``dare_ties`` are the same tensor functions as ``task_arithmetic`` and ``ties`` with DARE switched on by
default (drop probability 0.5, FusionBench's default); setting ``dare_p=0`` gives back the plain method bit for bit.
"""

from __future__ import annotations

from epmq.errors import EPMQError
from epmq.merge.average import AVERAGE
from epmq.merge.base import MergeMethod
from epmq.merge.task_arithmetic import DARE_TASK_ARITHMETIC, TASK_ARITHMETIC
from epmq.merge.ties import DARE_TIES, TIES

METHODS: dict[str, MergeMethod] = {m.name: m for m in (AVERAGE, TASK_ARITHMETIC, TIES, DARE_TASK_ARITHMETIC, DARE_TIES)}


def get_method(method: str | MergeMethod) -> MergeMethod:
    """The registered method of that name (a :class:`MergeMethod` is passed through)."""
    if isinstance(method, MergeMethod):
        return method
    if method not in METHODS:
        raise EPMQError(f"method={method!r}: unknown merge method, expected one of {sorted(METHODS)}")
    return METHODS[method]


def label(name: str | None) -> str | None:
    """The display label of merge method ``name`` (None for an unknown name)."""
    m = METHODS.get(name) if name is not None else None
    return m.label if m is not None else None
