"""Quantizers: the grid, RTN, GPTQ, the E-PMQ target solver, and the method registry.

Every method in :data:`METHODS` (:mod:`epmq.quant.methods`: one file per method, each one
:class:`~epmq.quant.methods.base.Quantizer` object) is one choice of (target, Hessian, rounding) per Linear layer:

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

from epmq.quant.methods import METHODS, QuantMethod, Quantizer

__all__ = ["METHODS", "QuantMethod", "Quantizer", "gptq", "rtn", "epmq_target", "TaskStats", "QuantResult"]


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
