"""GPTQ (Frantar et al., arXiv 2210.17323), faithful to the IST-DASLab reference, and RTN.

For one Linear layer with weight W (d_out x d_in) and the Gram matrix H = X X^T of its calibration inputs,
GPTQ minimises tr((Q - W) H (Q - W)^T) over Q on the grid, one column at a time, pushing each column's
rounding error onto the columns not yet quantized through the upper Cholesky factor of H^-1, with lazy
updates in blocks of ``block_size`` columns. Reference details kept here:

* dead inputs (diag(H) == 0): H_ii := 1 and W[:, i] := 0;
* damping: H += damp * mean(diag H) * I; if the Cholesky factorisation fails, damp is multiplied by 10 and
  the factorisation retried (up to ``max_damp``), then an :class:`EPMQError` is raised;
* act-order: columns are quantized in descending diag(H); the permutation is recorded in ``perm`` and each
  column's group in ``g_idx``;
* groups: with ``static_groups`` the grids of all groups are fixed up front from the (unpermuted) target;
  otherwise a group's grid is found from the error-updated weights when its first column is reached.

The scale of H does not change Q, only the reported loss. The same function is E-PMQ's rounding engine:
``gptq(*epmq_target(...), bits)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmq.errors import EPMQError, all_finite, check_finite
from epmq.quant.grid import GridSpec, dequantize, find_params, quantize_codes
from epmq.quant.result import QuantResult

__all__ = ["gptq", "gptq_shared", "inverse_cholesky_upper", "rtn"]


def _check_weight(W: torch.Tensor, name: str) -> torch.Tensor:
    if W.ndim != 2:
        raise EPMQError(f"{name}: expected a 2-D weight (d_out x d_in), got shape {tuple(W.shape)}")
    return check_finite(W, name)


def rtn(W: torch.Tensor, bits: int, *, group_size: int = -1, sym: bool = False, name: str = "W") -> QuantResult:
    """Round-to-nearest on the min/max grid (per row, or per group of ``group_size`` columns).

    Returns a :class:`QuantResult` with the fake-quant ``.weight`` and the integer codes, scales and zeros.
    """
    _check_weight(W, name)
    spec = GridSpec(bits, group_size, sym)
    W = W.detach().float()
    d_out, d_in = W.shape
    gs = d_in if group_size == -1 else group_size
    n_groups = spec.n_groups(d_in)
    g_idx = torch.arange(d_in, device=W.device) // gs
    scales = torch.empty(d_out, n_groups, device=W.device)
    zeros = torch.empty_like(scales)
    for g in range(n_groups):
        scales[:, g], zeros[:, g] = find_params(W[:, g * gs : (g + 1) * gs], spec)
    s, z = scales[:, g_idx], zeros[:, g_idx]
    codes = quantize_codes(W, s, z, spec.maxq)
    return QuantResult(
        weight=dequantize(codes, s, z),
        codes=codes.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        perm=None,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def inverse_cholesky_upper(
    H: torch.Tensor, damp: float, *, max_damp: float = 10.0, name: str = "H"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising ``damp`` x10 on failure.

    Returns the factor and the relative damping that succeeded.
    """
    mean_diag = float(torch.diag(H).mean())
    if not mean_diag > 0:
        raise EPMQError(f"{name}: the Hessian has a non-positive mean diagonal ({mean_diag}); no usable inputs")
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + (d * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and all_finite(U):
                return U, d
        if d >= max_damp:
            raise EPMQError(
                f"{name}: Cholesky factorisation failed even with relative damping {d:g}; "
                "the calibration statistics are degenerate (check for NaN/Inf or too few samples)"
            )
        d = max(d * 10, 1e-6)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    *,
    group_size: int = -1,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    engine: str = "fast",
    name: str = "W",
    _row_losses: list | None = None,
) -> QuantResult:
    """Quantize ``W`` (d_out x d_in) to ``bits`` with GPTQ error feedback under Hessian ``H`` (d_in x d_in).

    Args:
        W: target weight (the merged weight for GPTQ, E-PMQ's W* for E-PMQ).
        H: Gram matrix of the layer inputs (any positive scale), float32 or float64.
        bits: 2..8.
        group_size: -1 for one grid per row, else columns per group.
        sym: symmetric grid (zero = (maxq+1)/2).
        act_order: quantize columns in descending diag(H) (recorded in ``perm`` / ``g_idx``).
        static_groups: with groups and act-order, fix all group grids up front.
        damp: relative damping (fraction of mean diag H), raised automatically on a failed Cholesky.
        block_size: lazy-update block width.
        engine: ``"fast"`` (default): each block's columns in one kernel call (:mod:`epmq.quant.kernels`:
            numba on CPU, Triton on CUDA, else a torch loop), same results; ``"plain"``: the reference's
            per-column loop, kept as the baseline and the definition the fast engine is tested against.
        name: used in error messages.

    Returns:
        :class:`QuantResult` with fake-quant ``weight``, ``codes``, ``scales``, ``zeros``, ``g_idx`` and ``perm``
        in the original column order; ``info`` holds the damping used and the GPTQ loss.
    """
    _check_weight(W, name)
    spec = GridSpec(bits, group_size, sym)
    d_out, d_in = W.shape
    if H.shape != (d_in, d_in):
        raise EPMQError(f"{name}: Hessian shape {tuple(H.shape)} does not match d_in={d_in} of weight {tuple(W.shape)}")
    check_finite(H, f"{name} (Hessian)")
    if block_size < 1:
        raise EPMQError(f"block_size={block_size}: must be positive")
    if engine not in ("fast", "plain"):
        raise EPMQError(f"engine={engine!r}: expected 'fast' or 'plain'")
    device = W.device
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=device, dtype=torch.float32).clone()
    gs = d_in if group_size == -1 else group_size
    n_groups = spec.n_groups(d_in)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if static_groups and group_size != -1:
        static = [find_params(W[:, g * gs : (g + 1) * gs], spec) for g in range(n_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp_used = inverse_cholesky_upper(H, damp, name=f"{name} (Hessian)")
    del H

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    losses = torch.zeros(d_out, device=device)
    scales = torch.empty(d_out, n_groups, device=device)
    zeros = torch.empty_like(scales)
    col_group = torch.empty(d_in, dtype=torch.long, device=device)  # group of quantization position j
    scale = zero = None
    if group_size == -1:
        scale, zero = find_params(W, spec)
        scales[:, 0], zeros[:, 0] = scale, zero

    cols = _Columns(W, Hinv, spec, gs, block_size, static, perm, scale, zero)
    filled = _Filled(Q, codes, losses, scales, zeros, col_group)
    if engine == "fast":
        _fast_blocks(cols, filled)
    else:  # the reference loop, column by column
        _plain_blocks(cols, filled)

    g_idx = col_group
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, codes, g_idx = Q[:, invperm], codes[:, invperm], col_group[invperm]
    if not all_finite(Q):
        raise EPMQError(f"{name}: GPTQ produced non-finite weights (damping {damp_used:g})")
    result = QuantResult(
        weight=Q,
        codes=codes.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        perm=perm,
        bits=bits,
        group_size=group_size,
        sym=sym,
        info={"damp": damp_used, "gptq_loss": float(losses.sum())},
    )
    if _row_losses is not None:
        _row_losses.append(losses)
    return result


def gptq_shared(weights, H: torch.Tensor, bits: int, *, name: str = "W", **kwargs) -> list[QuantResult]:
    """GPTQ of several weights that share one Hessian (Linears fed by the same input, e.g. q/k/v): their
    rows stacked into one call, so the Hessian is inverted once and each block's kernel runs once. GPTQ
    treats rows independently, so each result equals ``gptq(W_i, H, bits, **kwargs)`` up to float rounding
    in the lazy block update (a matrix product over more rows). ``kwargs`` are :func:`gptq`'s."""
    weights = list(weights)
    if not weights:
        return []
    for i, W in enumerate(weights):
        _check_weight(W, f"{name}[{i}]")
        if W.shape[1] != weights[0].shape[1]:
            raise EPMQError(f"{name}: weights sharing a Hessian need the same d_in, got "
                            f"{[tuple(w.shape) for w in weights]}")
    losses: list[torch.Tensor] = []
    res = gptq(torch.cat([W.detach().float() for W in weights]), H, bits, name=name, _row_losses=losses, **kwargs)
    out, r0 = [], 0
    for W in weights:
        rows = slice(r0, r0 + W.shape[0])
        r0 += W.shape[0]
        out.append(QuantResult(
            weight=res.weight[rows].clone(), codes=res.codes[rows].clone(), scales=res.scales[rows].clone(),
            zeros=res.zeros[rows].clone(),
            # own copies: tensors sharing storage cannot be saved together (safetensors refuses them)
            g_idx=res.g_idx.clone(), perm=None if res.perm is None else res.perm.clone(),
            bits=res.bits, group_size=res.group_size, sym=res.sym,
            info={"damp": res.info["damp"], "gptq_loss": float(losses[0][rows].sum()), "shared": len(weights)},
        ))
    return out


@dataclass(frozen=True)
class _Columns:
    """What the block loops (:func:`_fast_blocks`, :func:`_plain_blocks`) work on, as :func:`gptq` prepared
    it: the (permuted) weight ``W``, updated in place by the error feedback, the upper Cholesky factor
    ``Hinv`` of H^-1, the grid ``spec``, the group width ``gs`` (d_in without groups), the lazy-update
    ``block_size``, the up-front group grids ``static`` (or None), the act-order permutation ``perm`` (or
    None), and the row grid ``scale``/``zero`` (without groups; else None)."""

    W: torch.Tensor
    Hinv: torch.Tensor
    spec: GridSpec
    gs: int
    block_size: int
    static: list | None
    perm: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None


@dataclass(frozen=True)
class _Filled:
    """The tensors the block loops fill (allocated by :func:`gptq`)."""

    Q: torch.Tensor
    codes: torch.Tensor
    losses: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    col_group: torch.Tensor


def _plain_blocks(cols: _Columns, out: _Filled) -> None:
    """The block loop of :func:`gptq` as the reference writes it: column by column, a dynamic group's grid
    found from the error-updated columns when its first column is reached. Fills ``out``."""
    W, Hinv, spec, gs, block_size = cols.W, cols.Hinv, cols.spec, cols.gs, cols.block_size
    static, perm, scale, zero = cols.static, cols.perm, cols.scale, cols.zero
    Q, codes, losses, scales, zeros, col_group = out.Q, out.codes, out.losses, out.scales, out.zeros, out.col_group
    d_in, group_size = W.shape[1], spec.group_size
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size != -1:
                if static is not None:
                    orig = int(perm[j]) if perm is not None else j
                    g = orig // gs
                    scale, zero = static[g]
                else:
                    g = j // gs
                    if j % gs == 0:
                        # grid of the next group from the error-updated columns (reference semantics)
                        Wg = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                        scale, zero = find_params(Wg, spec)
                scales[:, g], zeros[:, g] = scale, zero
                col_group[j] = g
            else:
                col_group[j] = 0
            w = W1[:, i]
            d = Hinv1[i, i]
            c = quantize_codes(w, scale, zero, spec.maxq)
            q = dequantize(c, scale, zero)
            codes[:, j] = c
            Q[:, j] = q
            err = (w - q) / d
            losses += (w - q) ** 2 / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def _fast_blocks(cols: _Columns, out: _Filled) -> None:
    """The block loop of :func:`gptq` with each block's columns done by one kernel call per segment (a block
    is split where a dynamic group starts, since that group's grid comes from the error-updated weights).
    Fills ``out`` (``Q``, ``codes``, ``losses``, ``scales``, ``zeros``, ``col_group``) like the plain loop."""
    from epmq.quant import kernels

    W, Hinv, spec, gs, block_size = cols.W, cols.Hinv, cols.spec, cols.gs, cols.block_size
    static, perm, scale, zero = cols.static, cols.perm, cols.scale, cols.zero
    Q, codes, losses, scales, zeros, col_group = out.Q, out.codes, out.losses, out.scales, out.zeros, out.col_group

    kern = kernels.block_kernel(kernels.pick(W.device))
    d_out, d_in = W.shape
    maxq = float(spec.maxq)
    grouped = spec.group_size != -1
    if grouped and static is not None:
        for g, (s, z) in enumerate(static):
            scales[:, g], zeros[:, g] = s, z
        st_s = torch.stack([s for s, _ in static], dim=1)
        st_z = torch.stack([z for _, z in static], dim=1)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        B = i2 - i1
        W1 = W[:, i1:i2].contiguous().clone()
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        Q1, C1, E1 = (torch.empty_like(W1) for _ in range(3))
        cols = torch.arange(i1, i2, device=W.device)
        cuts = [0, B]
        if not grouped:
            S1, Z1 = scale[:, None].expand(d_out, B).contiguous(), zero[:, None].expand(d_out, B).contiguous()
            col_group[i1:i2] = 0
        elif static is not None:
            g = (cols if perm is None else perm[i1:i2]) // gs
            S1, Z1 = st_s[:, g].contiguous(), st_z[:, g].contiguous()
            col_group[i1:i2] = g
        else:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
            col_group[i1:i2] = cols // gs
            cuts = sorted({0, B, *(j - i1 for j in range(i1, i2) if j % gs == 0)})
        for a, b in zip(cuts[:-1], cuts[1:]):
            if grouped and static is None:
                if (i1 + a) % gs == 0:  # a new group: its grid from the error-updated columns (reference)
                    Wg = torch.cat([W1[:, a:], W[:, i2:]], dim=1)[:, :gs]
                    scale, zero = find_params(Wg, spec)
                    g = (i1 + a) // gs
                    scales[:, g], zeros[:, g] = scale, zero
                S1[:, a:b] = scale[:, None]
                Z1[:, a:b] = zero[:, None]
            kern(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, losses)
        Q[:, i1:i2], codes[:, i1:i2] = Q1, C1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
