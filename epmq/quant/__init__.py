"""Quantizers: the grid, RTN, GPTQ, the E-PMQ target solver, and the method registry.

Every method in :data:`METHODS` is one choice of (target, Hessian, rounding) per Linear layer:

========================  ===============  =====================  ========
method                    target           Hessian                rounding
========================  ===============  =====================  ========
``rtn``                   W_m              --                     RTN
``gptq``                  W_m              pooled X X^T           GPTQ
``epmq``                  W* (E-PMQ)       H (E-PMQ)              GPTQ
``epmq_unrounded``        W* (E-PMQ)       --                     none
``gptq_corrected``        W* (E-PMQ)       pooled X X^T           GPTQ
``gptq_epmq_hessian``     W_m              H (E-PMQ)              GPTQ
========================  ===============  =====================  ========

The last three are the ablations of METHOD.md section 5: ``epmq_unrounded`` is E-PMQ's continuous
target with no rounding (merging-deviation repair alone), ``gptq_corrected`` corrects in full precision
then runs plain GPTQ, and ``gptq_epmq_hessian`` uses E-PMQ's task-balanced Hessian with the merged target
(no expert information).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "QuantMethod", "gptq", "rtn", "epmq_target", "TaskStats", "QuantResult"]


@dataclass(frozen=True)
class QuantMethod:
    name: str
    target: str  # "merged" | "epmq"
    hessian: str | None  # "pooled" | "epmq" | None
    rounding: str | None  # "rtn" | "gptq" | None
    description: str
    paper: str = ""
    ablation: bool = False

    @property
    def needs_experts(self) -> bool:
        return self.target == "epmq" or self.hessian == "epmq"

    @property
    def needs_calibration(self) -> bool:
        return self.hessian is not None or self.target == "epmq"


_GPTQ = "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers, arXiv:2210.17323"
_EPMQ = "Expert-guided post-merge quantization (E-PMQ), arXiv:2605.16882"

METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in [
        QuantMethod("rtn", "merged", None, "rtn", "round-to-nearest on the min/max grid"),
        QuantMethod("gptq", "merged", "pooled", "gptq", "GPTQ on the merged weights, pooled calibration", _GPTQ),
        QuantMethod("epmq", "epmq", "epmq", "gptq", "E-PMQ: GPTQ rounding of the expert-guided target", _EPMQ),
        QuantMethod(
            "epmq_unrounded", "epmq", None, None, "ablation: E-PMQ target W*, not rounded", _EPMQ, ablation=True
        ),
        QuantMethod(
            "gptq_corrected", "epmq", "pooled", "gptq", "ablation: W* then plain GPTQ", _EPMQ, ablation=True
        ),
        QuantMethod(
            "gptq_epmq_hessian",
            "merged",
            "epmq",
            "gptq",
            "ablation: GPTQ with E-PMQ's Hessian, merged target",
            _EPMQ,
            ablation=True,
        ),
    ]
}


_LAZY = {
    "gptq": "epmq.quant.rounding",
    "rtn": "epmq.quant.rounding",
    "epmq_target": "epmq.quant.target",
    "TaskStats": "epmq.quant.target",
    "QuantResult": "epmq.quant.result",
}


def __getattr__(name):  # lazy: keep `import epmq.quant` (the registry) free of torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'epmq.quant' has no attribute {name!r}")
