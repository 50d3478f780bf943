"""GPTQ on the merged weights with the pooled calibration Hessian: the baseline of the leaderboard's Δ columns."""

from epmq.quant.methods.base import Quantizer

PAPER = "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers, arXiv:2210.17323"

GPTQ = Quantizer(
    "gptq", "merged", "pooled", "gptq", "GPTQ on the merged weights, pooled calibration", PAPER,
    label="GPTQ", order=20, colour="#1f77b4", baseline=True,
)
