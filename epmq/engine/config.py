"""What one quantization run is asked to do (:class:`QuantConfig`) and what it did (:class:`QuantizeReport`),
plus the tables of the three precision knobs (``forward_dtype`` / ``act_dtype`` / ``stats_dtype``) the
workflow's schema is checked against (:data:`DTYPE_KNOBS`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epmq.errors import EPMQError
from epmq.precision import DTYPES, STATS_DTYPES
from epmq.quant import METHODS, QuantMethod
from epmq.quant.result import QuantResult

__all__ = ["QuantConfig", "QuantizeReport", "DTYPE_KNOBS", "FORWARD_DTYPES", "ACT_DTYPES", "named_dtype"]


@dataclass
class QuantConfig:
    """Every knob of one quantization run (what the workflow's ``params:`` carry)."""

    method: str = "epmq"
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    alpha: float = 1.0
    lam_out: float = 0.0
    lam_w: float = 1e-2
    task_weighting: str = "trace"
    fit_bias: bool = False
    propagation: str = "sequential"
    forward_dtype: str = "fp32"  # dtype of the block forwards (autocast); statistics stay float32
    act_dtype: str = "fp32"  # dtype the propagated hidden states are stored in between blocks (bf16/fp16: half)
    stats_dtype: str = "fp32"  # layer inputs rounded to this before the Gram products (sums stay float32)

    def __post_init__(self):
        if self.method not in METHODS:
            raise EPMQError(f"method={self.method!r}: expected one of {sorted(METHODS)}")
        if self.propagation not in ("sequential", "fp"):
            raise EPMQError(f"propagation={self.propagation!r}: expected 'sequential' or 'fp'")
        named_dtype("forward_dtype", self.forward_dtype)
        named_dtype("act_dtype", self.act_dtype)
        named_dtype("stats_dtype", self.stats_dtype)

    @property
    def spec(self) -> QuantMethod:
        return METHODS[self.method]


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: results per quantized parameter (full state-dict name) and a log row
    per layer (seconds, errors)."""

    results: dict[str, QuantResult] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


FORWARD_DTYPES = DTYPES  # statistics are accumulated in float32 whatever the forward dtype
#: ``act_dtype`` name -> dtype the propagated hidden states are stored in between blocks (None: as computed)
ACT_DTYPES = DTYPES
#: knob name -> its table of dtype names (the config schema's enums are checked against these)
DTYPE_KNOBS = {"forward_dtype": FORWARD_DTYPES, "act_dtype": ACT_DTYPES, "stats_dtype": STATS_DTYPES}


def named_dtype(knob: str, name: str) -> torch.dtype | None:
    """The dtype a ``forward_dtype`` / ``act_dtype`` / ``stats_dtype`` name stands for (None: float32, no
    cast); a clear error naming the knob otherwise."""
    table = DTYPE_KNOBS[knob]
    if name not in table:
        raise EPMQError(f"{knob}={name!r}: expected one of {sorted(table)}")
    return table[name]
