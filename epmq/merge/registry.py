"""The registry of merge methods, ``METHODS``: name -> :class:`~epmq.merge.base.MergeMethod`.

The config schema's merge-method enum is checked against these names. ``dare_task_arithmetic`` and
``dare_ties`` are the same tensor functions as ``task_arithmetic`` and ``ties`` with DARE switched on by
default (drop probability 0.5, FusionBench's default); setting ``dare_p=0`` gives back the plain method
bit for bit.
"""

from __future__ import annotations

from epmq.errors import EPMQError
from epmq.merge.average import average
from epmq.merge.base import MergeMethod
from epmq.merge.task_arithmetic import task_arithmetic
from epmq.merge.ties import prepare_ties, ties

_TA_PAPER = "Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089"
_TIES_PAPER = "TIES-Merging: Resolving Interference When Merging Models, https://arxiv.org/abs/2306.01708"
_DARE_PAPER = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
    "https://arxiv.org/abs/2311.03099"
)
_TA_DEFAULTS = {"lam": 0.3, "dare_p": 0.0, "seed": 0}
_TIES_DEFAULTS = {"k": 20.0, "lam": 0.3, "merge_func": "sum", "trim_scope": "global", "dare_p": 0.0, "seed": 0}

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            name="average",
            fn=average,
            paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
            "increasing inference time, https://arxiv.org/abs/2203.05482",
            description="mean of the expert weights, (1/T) Σ_t θ_t",
            needs_base=False,
        ),
        MergeMethod(
            name="task_arithmetic",
            fn=task_arithmetic,
            paper=_TA_PAPER,
            description="θ₀ + λ Σ_t τ_t with task vectors τ_t = θ_t − θ₀",
            defaults=_TA_DEFAULTS,
        ),
        MergeMethod(
            name="ties",
            fn=ties,
            paper=_TIES_PAPER,
            description="trim each τ_t to its top-k% magnitudes, elect a sign per entry, disjoint mean/sum "
            "over agreeing experts, θ₀ + λ τ_m",
            defaults=_TIES_DEFAULTS,
            prepare=prepare_ties,
        ),
        MergeMethod(
            name="dare_task_arithmetic",
            fn=task_arithmetic,
            paper=f"{_DARE_PAPER}; {_TA_PAPER}",
            description="task arithmetic on DARE-sparsified task vectors (drop with prob. p, rescale 1/(1−p))",
            defaults={**_TA_DEFAULTS, "dare_p": 0.5},
        ),
        MergeMethod(
            name="dare_ties",
            fn=ties,
            paper=f"{_DARE_PAPER}; {_TIES_PAPER}",
            description="TIES-Merging on DARE-sparsified task vectors (drop with prob. p, rescale 1/(1−p))",
            defaults={**_TIES_DEFAULTS, "dare_p": 0.5},
            prepare=prepare_ties,
        ),
    )
}


def get_method(method: str | MergeMethod) -> MergeMethod:
    """The registered method of that name (a :class:`MergeMethod` is passed through)."""
    if isinstance(method, MergeMethod):
        return method
    if method not in METHODS:
        raise EPMQError(f"method={method!r}: unknown merge method, expected one of {sorted(METHODS)}")
    return METHODS[method]
