"""Ablation (METHOD.md section 5): GPTQ of the merged weights under E-PMQ's task-balanced Hessian (the experts
shape only the Hessian, not the target)."""

from epmq.quant.methods.base import Quantizer
from epmq.quant.methods.epmq import PAPER

GPTQ_EPMQ_HESSIAN = Quantizer(
    "gptq_epmq_hessian", "merged", "epmq", "gptq", "ablation: GPTQ with E-PMQ's Hessian, merged target", PAPER,
    ablation=True, label="GPTQ, E-PMQ Hessian, merged target", order=60, colour="#2ca02c",
)
