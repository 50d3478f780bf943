"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089).

    τ_t = θ_t − θ₀,    θ_m = θ₀ + λ Σ_t τ_t

λ = 0.3 by default (FusionBench's setting for CLIP ViT-B/32, 8 tasks). With ``dare_p > 0`` every τ_t is
first DARE-sparsified (:mod:`epmq.merge.dare`), which is DARE + task arithmetic (arXiv 2311.03099).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epmq.merge.base import task_vectors

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
    """θ₀ + λ Σ_t τ_t in float32 (τ_t DARE-sparsified when ``dare_p > 0``)."""
    taus = task_vectors(base, experts, dare_p=dare_p, seed=seed)
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return base.float() + lam * total
