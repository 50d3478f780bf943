"""Mixed-precision forwards: the dtype names configs use and one autocast context for all of them.

Weights (and optimizer state, and calibration statistics) stay float32; only the forward passes run under
``torch.autocast`` in the named dtype. ``"fp32"`` means no autocast.
"""

from __future__ import annotations

import contextlib
import functools

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


#: ``stats_dtype`` names: the precision the calibration layer inputs are rounded to before their Gram
#: products (always accumulated and stored in float32)
STATS_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    """Whether CPU float32 matmuls can run on bf16 hardware (oneDNN's bf16 math mode) here (asked once: it
    is a property of the machine, and :func:`add_gram` calls it for every product)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(torch.backends.mkldnn, "matmul"))
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _onednn_fp32_precision(mode: str):
    flags = torch.backends.mkldnn.matmul
    old = flags.fp32_precision
    flags.fp32_precision = mode
    try:
        yield
    finally:
        flags.fp32_precision = old


@contextlib.contextmanager
def _cublas_tf32():
    """cuBLAS float32 GEMMs on TF32 tensor cores for the duration (the flag is restored after)."""
    flags = torch.backends.cuda.matmul
    old = flags.fp32_precision
    flags.fp32_precision = "tf32"
    try:
        yield
    finally:
        flags.fp32_precision = old


def _bf16_gram_context(device: torch.device):
    """The math mode :func:`add_gram` runs a product of bf16 values in: oneDNN's bf16 mode on a CPU with bf16
    matmul hardware, TF32 on CUDA (TF32 keeps 10 mantissa bits, bf16 values have 7: the inputs pass
    unrounded, products are exact and sums float32), else plain float32."""
    if device.type == "cpu" and _onednn_bf16():
        return _onednn_fp32_precision("bf16")
    if device.type == "cuda" and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return _cublas_tf32()
    return contextlib.nullcontext()


def add_gram(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> None:
    """``acc += a^T b`` in float32 (``a``, ``b``: float32 (N, d)). With ``dtype`` (bf16), ``a`` and ``b`` must
    hold values already rounded to it (float32 tensors of bf16 values, see ``TaskStats._augment``); the result
    is then the float32-accumulated product of those values whatever runs it: on a CPU with bf16 matmul
    hardware, oneDNN's bf16 math mode (bf16 products -- exact here, the inputs being bf16 values -- float32
    accumulation and output; the GEMM ~2.6x faster than float32 at d = 1536); on CUDA, a TF32 GEMM (exact on
    bf16 values for the same reason; not yet timed: no GPU so far); elsewhere a float32 product."""
    mode = _bf16_gram_context(acc.device) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with mode:
        acc.addmm_(a.T, b)
