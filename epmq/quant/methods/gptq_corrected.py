"""Ablation (METHOD.md section 5): correct in full precision (E-PMQ's W*), then plain GPTQ with the pooled
Hessian."""

from epmq.quant.methods.base import Quantizer
from epmq.quant.methods.epmq import PAPER

GPTQ_CORRECTED = Quantizer(
    "gptq_corrected", "epmq", "pooled", "gptq", "ablation: W* then plain GPTQ", PAPER, ablation=True,
    label="GPTQ on E-PMQ-corrected model", order=50, colour="#9467bd",
)
