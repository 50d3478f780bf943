"""Ablation (METHOD.md section 5): E-PMQ's continuous target W*, not rounded -- the merging-deviation repair
alone. Not a quantized model: it has no bit width of its own and is never ranked."""

from epmq.quant.methods.base import Quantizer
from epmq.quant.methods.epmq import PAPER

EPMQ_UNROUNDED = Quantizer(
    "epmq_unrounded", "epmq", None, None, "ablation: E-PMQ target W*, not rounded", PAPER, ablation=True,
    label="E-PMQ target, unrounded", order=40, colour="#ff7f0e", ranked=False,
)
