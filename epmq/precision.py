"""Mixed-precision forwards: the dtype names configs use and one autocast context for all of them.

Weights (and optimizer state, and calibration statistics) stay float32; only the forward passes run under
``torch.autocast`` in the named dtype. ``"fp32"`` means no autocast.
"""

from __future__ import annotations

import contextlib

import torch

#: config name -> autocast dtype (None: plain float32)
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name_or_dtype) -> torch.dtype | None:
    return DTYPES[name_or_dtype] if isinstance(name_or_dtype, str) else name_or_dtype


def autocast(device, name_or_dtype):
    """``torch.autocast`` on ``device``'s type in ``name_or_dtype`` (a :data:`DTYPES` key or a dtype); a null
    context for ``"fp32"`` / None."""
    dtype = _dtype(name_or_dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def linear_weights_in(module: torch.nn.Module, name_or_dtype):
    """For inference under :func:`autocast`: hold every ``nn.Linear``'s weight and bias in the autocast dtype
    for the duration (the fp32 tensors come back on exit). Autocast casts a Linear's weight on every call;
    casting once gives the same bits (a cast of a cast is a no-op) without the per-batch copies. A null
    context for ``"fp32"``."""
    dtype = _dtype(name_or_dtype)
    if dtype is None:
        yield module
        return
    saved = []
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                for k in ("weight", "bias"):
                    p = getattr(m, k)
                    if p is not None and p.dtype != dtype:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
    try:
        yield module
    finally:
        for p, data in saved:
            p.data = data
