"""E-PMQ (METHOD.md): GPTQ rounding of the expert-guided target W* under E-PMQ's task-balanced Hessian H; the
headline method, shown with its Δ against GPTQ."""

from epmq.quant.methods.base import Quantizer

PAPER = "Expert-guided post-merge quantization (E-PMQ), arXiv:2605.16882"

EPMQ = Quantizer(
    "epmq", "epmq", "epmq", "gptq", "E-PMQ: GPTQ rounding of the expert-guided target", PAPER,
    label="E-PMQ", order=30, colour="#d62728", headline=True,
)
