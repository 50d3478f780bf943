"""Simple weight averaging (model soup; Wortsman et al., arXiv 2203.05482).

    θ_m = (1/T) Σ_t θ_t

The base model θ₀ plays no part in the arithmetic; the driver only uses it, when given, as the reference
for keys, dtypes and the excluded (copied) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epmq.merge.base import MergeMethod, iter_experts

if TYPE_CHECKING:
    import torch


def average(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the expert tensors, in float32 (``base`` is ignored); one pass over ``experts``."""
    total = None
    for expert in iter_experts(experts):
        if total is None:
            total = expert.float().clone()
        else:
            total += expert.float()
        del expert
    return total.div_(len(experts))


AVERAGE = MergeMethod(
    name="average",
    fn=average,
    paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
    "increasing inference time, https://arxiv.org/abs/2203.05482",
    description="mean of the expert weights, (1/T) Σ_t θ_t",
    needs_base=False,
    label="Average",
)
