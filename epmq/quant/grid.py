"""The uniform min/max grid shared by RTN and GPTQ (IST-DASLab reference semantics).

For each row (or each group of ``group_size`` columns within a row) the grid covers [min, max] extended to
always contain 0:

* asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``;
* symmetric: ``max = max(|min|, max)``, ``min = -max``, ``zero = (maxq + 1) / 2``;
* an all-zero row gets the range [-1, 1] so that its scale is never 0.

``codes = clamp(round(w / scale) + zero, 0, maxq)`` and the fake-quant value is ``scale * (codes - zero)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmq.errors import EPMQError, check_bits


@dataclass(frozen=True)
class GridSpec:
    """How a weight is gridded: ``bits`` (2..8), ``group_size`` (-1 = one group per row), ``sym``."""

    bits: int
    group_size: int = -1
    sym: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise EPMQError(f"group_size={self.group_size!r}: expected -1 (per row) or a positive integer")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, d_in: int) -> int:
        return 1 if self.group_size == -1 else -(-d_in // self.group_size)


def find_params(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the grid for ``w`` (rows x cols), each of shape (rows,)."""
    w = w.float()
    maxq = spec.maxq
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer grid codes (as float) of ``w``; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def expand_groups(per_group: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """(rows, n_groups) -> (rows, cols) by column group index."""
    return per_group[:, g_idx.long()]
