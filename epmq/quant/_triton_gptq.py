"""The Triton (CUDA) GPTQ block kernel; see :mod:`epmq.quant.kernels` for the contract. Imported only when
Triton is installed. Tested on CPU under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rint(x):
    # round half to even (torch.round), exact for |x| < 2**23 and without libdevice (the interpreter has none)
    fl = tl.floor(x)
    frac = x - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, fl + 1.0, fl)


@triton.jit
def _segment(W_ptr, H_ptr, S_ptr, Z_ptr, Q_ptr, C_ptr, E_ptr, L_ptr, rows, B, a, b, maxq,
             BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program: BLOCK_R rows of the block, all its columns in registers; columns [a, b) in order
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    rmask = r < rows
    cmask = cols < B
    tile = r[:, None] * B + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    w = tl.load(W_ptr + tile, mask=m2, other=0.0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(a, b):
        wi = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)  # column i (the other terms are exact zeros)
        s = tl.load(S_ptr + r * B + i, mask=rmask, other=1.0)
        z = tl.load(Z_ptr + r * B + i, mask=rmask, other=0.0)
        c = _rint(wi / s) + z
        c = tl.minimum(tl.maximum(c, 0.0), maxq)
        q = s * (c - z)
        d = tl.load(H_ptr + i * B + i)
        diff = wi - q
        e = diff / d
        acc += diff * diff / (d * d) / 2.0
        h = tl.load(H_ptr + i * B + cols, mask=cmask & (cols > i), other=0.0)
        w = w - e[:, None] * h[None, :]
        tl.store(Q_ptr + r * B + i, q, mask=rmask)
        tl.store(C_ptr + r * B + i, c, mask=rmask)
        tl.store(E_ptr + r * B + i, e, mask=rmask)
    tl.store(W_ptr + tile, w, mask=m2)
    tl.store(L_ptr + r, tl.load(L_ptr + r, mask=rmask, other=0.0) + acc, mask=rmask)


def run(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, loss):
    rows, B = W1.shape
    block_b = triton.next_power_of_2(B)
    block_r = max(1, min(32, 4096 // block_b))
    grid = (triton.cdiv(rows, block_r),)
    _segment[grid](W1, Hinv1, S1, Z1, Q1, C1, E1, loss, rows, B, int(a), int(b), float(maxq),
                   BLOCK_R=block_r, BLOCK_B=block_b)
