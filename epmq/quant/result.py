"""The object every quantizer returns, and the layer-error helpers used by tests and logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class QuantResult:
    """A quantized weight matrix W (d_out x d_in), in the original column order.

    Attributes:
        weight: fake-quant (dequantized) weight, float32, ``scales[:, g_idx] * (codes - zeros[:, g_idx])``.
        codes: integer grid codes in [0, 2**bits - 1], int32/uint8, same shape as ``weight``.
        scales: (d_out, n_groups) float32 grid scales.
        zeros: (d_out, n_groups) float32 zero points (integers stored as float).
        g_idx: (d_in,) int32 group index of every column (with act-order, groups follow the
            quantization order, so consecutive columns need not share a group).
        perm: (d_in,) int64 order in which columns were quantized (act-order), or None (natural order).
        bits, group_size, sym: the grid.
        bias: optional refitted bias (d_out,), float32, or None when the bias was left untouched.
        info: free-form numbers for logs (loss, damping used, ...).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    sym: bool
    bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """Recompute the fake-quant weight from codes/scales/zeros/g_idx (what the packed loader does)."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g])


def layer_error(delta_w: torch.Tensor, H: torch.Tensor, *, float32: bool = False) -> float:
    """tr(dW H dW^T): the layer's output error on the calibration data whose Gram matrix is H.

    The one place this trace is computed (tests, :func:`epmq.quant.target.objective`, the quantizer's
    diagnostics). By default in float64 (one ``einsum`` over float64 copies); ``float32=True`` is the
    cheaper form the per-layer diagnostics log, ``((dW @ H) * dW).sum()`` with dW in float32 and ``H`` as
    given (a float64 solve would cost as much as the quantization). The two forms round differently, so
    each caller keeps the one its recorded numbers were made with."""
    if float32:
        dw = delta_w.float()
        return float(((dw @ H) * dw).sum())
    dw = delta_w.double()
    return float(torch.einsum("ij,jk,ik->", dw, H.double(), dw))
