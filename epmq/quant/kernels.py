"""Block kernels of the fast GPTQ engine: the per-column work of one lazy-update block in one call.

Inside a block of B columns GPTQ is sequential along columns but independent across rows: for column i,
every row r rounds ``w = W1[r, i]`` on its grid, forms ``e = (w - q) / Hinv1[i, i]`` and pushes it onto the
row's remaining columns, ``W1[r, j] -= e * Hinv1[i, j]`` (j > i). The plain path (``gptq(engine="plain")``,
the reference's loop) issues ~10 tensor operations per column; on a GPU each is a kernel launch and the loop
is launch-bound (~160 us per column on an H100, 82,944 columns for ViT-B/32). The kernels here do all the
columns of a block segment in one call, each row (or tile of rows) kept in registers/cache:

* ``numba`` (CPU): a compiled loop, parallel over rows; bit-identical to the plain path (same float32
  operations in the same order: no fast-math, no contraction);
* ``triton`` (CUDA): one program per tile of rows, the block's columns in registers; equal to the plain path
  within float tolerance (the compiler may fuse the update into an FMA). Tested on CPU under
  ``TRITON_INTERPRET=1``;
* ``torch``: the plain per-column loop over the block, for machines with neither.

A kernel call covers columns ``[a, b)`` of a block with per-(row, column) grids ``S1``/``Z1``; the caller
splits blocks at group starts (where a new grid is found from the error-updated weights) and does the lazy
update of the columns after the block as one matrix product.

``EPMQ_GPTQ_KERNEL`` (``numba`` / ``triton`` / ``torch``) forces a kernel; by default the fastest available
one for the device is used.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from epmq.errors import EPMQError

__all__ = ["KERNELS", "available", "block_kernel", "pick"]

KERNELS = ("numba", "triton", "torch")


# ------------------------------------------------------------------ torch (fallback; the plain loop)


def _torch_segment(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, loss):
    for i in range(a, b):
        w = W1[:, i]
        s, z = S1[:, i], Z1[:, i]
        c = torch.clamp(torch.round(w / s) + z, 0, maxq)
        q = s * (c - z)
        d = Hinv1[i, i]
        e = (w - q) / d
        loss += (w - q) ** 2 / d**2 / 2
        W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Q1[:, i], C1[:, i], E1[:, i] = q, c, e


# ------------------------------------------------------------------ numba (CPU)


@lru_cache(maxsize=1)
def _numba_impl():
    import numba
    import numpy as np

    def segment(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, loss):  # pragma: no cover - compiled
        rows, B = W1.shape
        zero = np.float32(0.0)
        two = np.float32(2.0)
        for r in numba.prange(rows):  # a plain range when compiled without parallel
            acc = zero
            for i in range(a, b):
                w = W1[r, i]
                s = S1[r, i]
                z = Z1[r, i]
                c = np.rint(w / s) + z
                if c < zero:
                    c = zero
                if c > maxq:
                    c = maxq
                q = s * (c - z)
                d = Hinv1[i, i]
                diff = w - q
                e = diff / d
                acc += diff * diff / (d * d) / two
                for j in range(i + 1, B):
                    W1[r, j] -= e * Hinv1[i, j]
                Q1[r, i] = q
                C1[r, i] = c
                E1[r, i] = e
            loss[r] += acc

    opts = dict(cache=True, fastmath=False, nogil=True)
    parallel = numba.njit(parallel=True, **opts)(segment)
    # one thread (the workflow's jobs): no thread pool at all, so no idle workers spinning beside torch
    serial = numba.njit(**opts)(segment)

    def run(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, loss):
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        arrs = [t.numpy() for t in (W1, Hinv1, S1, Z1, Q1, C1, E1, loss)]
        w1, h1, s1, z1, q1, c1, e1, ls = arrs
        if threads == 1:
            serial(w1, h1, s1, z1, int(a), int(b), np.float32(maxq), q1, c1, e1, ls)
            return
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        parallel(w1, h1, s1, z1, int(a), int(b), np.float32(maxq), q1, c1, e1, ls)

    return run


# ------------------------------------------------------------------ triton (CUDA)


def _triton_impl():
    from epmq.quant._triton_gptq import run  # module-level @triton.jit functions (Triton resolves globals)

    return run


# ------------------------------------------------------------------ choice


def available(kernel: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``kernel`` can run on ``device`` here (the library imports and the device type fits)."""
    dev = torch.device(device)
    try:
        if kernel == "numba":
            import numba  # noqa: F401

            return dev.type == "cpu"
        if kernel == "triton":
            import triton  # noqa: F401

            return dev.type == "cuda" or (dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    except ImportError:
        return False
    return kernel == "torch"


def pick(device: torch.device | str = "cpu") -> str:
    """The kernel for ``device``: ``EPMQ_GPTQ_KERNEL`` if set, else numba on CPU / triton on CUDA, else torch."""
    forced = os.environ.get("EPMQ_GPTQ_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise EPMQError(f"EPMQ_GPTQ_KERNEL={forced!r}: expected one of {', '.join(KERNELS)}")
        if not available(forced, device):
            raise EPMQError(f"EPMQ_GPTQ_KERNEL={forced}: not available for device {torch.device(device)} "
                            "(library not installed, or wrong device type)")
        return forced
    dev = torch.device(device)
    preferred = "numba" if dev.type == "cpu" else "triton" if dev.type == "cuda" else "torch"
    return preferred if available(preferred, dev) else "torch"


def block_kernel(kernel: str):
    """The callable ``(W1, Hinv1, S1, Z1, a, b, maxq, Q1, C1, E1, loss)`` for ``kernel``. All tensors float32
    and contiguous on one device; ``W1`` (rows x B) is updated in place, ``Q1``/``C1``/``E1`` get columns
    ``[a, b)``, ``loss`` (rows) is incremented."""
    if kernel == "numba":
        return _numba_impl()
    if kernel == "triton":
        return _triton_impl()
    if kernel == "torch":
        return _torch_segment
    raise EPMQError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
