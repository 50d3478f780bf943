"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089).

    τ_t = θ_t − θ₀,    θ_m = θ₀ + λ Σ_t τ_t

λ = 0.3 by default (FusionBench's setting for CLIP ViT-B/32, 8 tasks). With ``dare_p > 0`` every τ_t is
first DARE-sparsified (:mod:`epmq.merge.dare`), which is DARE + task arithmetic (arXiv 2311.03099).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epmq.merge.base import MergeMethod, iter_task_vectors

if TYPE_CHECKING:
    import torch


def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    lam: float = 0.3,
    dare_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """θ₀ + λ Σ_t τ_t in float32 (τ_t DARE-sparsified when ``dare_p > 0``).

    One pass over ``experts``, summing each τ_t as it is formed (in task order, as a sum over the list of
    task vectors would): two float32 tensors besides the inputs."""
    total = None
    for tau in iter_task_vectors(base, experts, dare_p=dare_p, seed=seed):
        if total is None:
            total = tau  # a fresh tensor: θ_1 − θ₀ (or its DARE-sparsified copy)
        else:
            total += tau
        del tau
    return total.mul_(lam).add_(base.float())  # = θ₀ + λ Σ τ bit for bit (IEEE addition commutes)


PAPER = "Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089"
DARE_PAPER = ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
              "https://arxiv.org/abs/2311.03099")
DEFAULTS = {"lam": 0.3, "dare_p": 0.0, "seed": 0}

TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    fn=task_arithmetic,
    paper=PAPER,
    description="θ₀ + λ Σ_t τ_t with task vectors τ_t = θ_t − θ₀",
    defaults=DEFAULTS,
    label="Task Arithmetic",
)

#: the same tensor function with DARE on by default (drop probability 0.5, FusionBench's default);
#: ``dare_p=0`` gives back plain task arithmetic bit for bit
DARE_TASK_ARITHMETIC = MergeMethod(
    name="dare_task_arithmetic",
    fn=task_arithmetic,
    paper=f"{DARE_PAPER}; {PAPER}",
    description="task arithmetic on DARE-sparsified task vectors (drop with prob. p, rescale 1/(1−p))",
    defaults={**DEFAULTS, "dare_p": 0.5},
    label="DARE + Task Arithmetic",
)
