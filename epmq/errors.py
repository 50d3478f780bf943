"""Errors and input checks shared by every layer.

Every check raises :class:`EPMQError` with a one-line message that names the culprit (tensor, key, file
or config field), so a bad input never turns into a silently wrong result.
"""

from __future__ import annotations


class EPMQError(ValueError):
    """A bad input to epmq: the message names the tensor, key, file or setting at fault."""


def check_bits(bits: int, *, name: str = "bits", allowed=range(2, 9)) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise EPMQError(f"{name}={bits!r} is out of range: expected an integer in {list(allowed)}")
    return bits


def all_finite(t) -> bool:
    """Whether tensor ``t`` holds no NaN or Inf. A NaN or Inf anywhere makes the sum non-finite, so a finite sum
    (one reduction, ~20x cheaper on CPU than ``isfinite(t).all()``) settles it; only a non-finite sum (a bad
    value, or finite values overflowing) takes the exact elementwise test."""
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(t, name: str):
    """Raise if tensor ``t`` holds NaN or Inf, naming it."""
    import torch

    if not all_finite(t):
        n_bad = int((~torch.isfinite(t)).sum())
        raise EPMQError(f"{name}: {n_bad} non-finite value(s) (NaN/Inf) in tensor of shape {tuple(t.shape)}")
    return t


def check_shape(t, shape, name: str):
    if tuple(t.shape) != tuple(shape):
        raise EPMQError(f"{name}: shape {tuple(t.shape)} does not match expected {tuple(shape)}")
    return t
