"""Simple weight averaging (model soup; Wortsman et al., arXiv 2203.05482).

    θ_m = (1/T) Σ_t θ_t

The base model θ₀ plays no part in the arithmetic; the driver only uses it, when given, as the reference
for keys, dtypes and the excluded (copied) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epmq.merge.base import check_experts

if TYPE_CHECKING:
    import torch


def average(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the expert tensors, in float32 (``base`` is ignored)."""
    check_experts(experts)
    total = experts[0].float().clone()
    for expert in experts[1:]:
        total += expert.float()
    return total / len(experts)
