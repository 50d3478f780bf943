"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089).

    τ_t = θ_t − θ₀,    θ_m = θ₀ + λ Σ_t τ_t

λ = 0.3 by default (FusionBench's setting for CLIP ViT-B/32, 8 tasks). With ``dare_p > 0`` every τ_t is
first DARE-sparsified (:mod:`epmq.merge.dare`), which is DARE + task arithmetic (arXiv 2311.03099).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epmq.merge.base import iter_task_vectors

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
