"""RTN: round-to-nearest of the merged weights on the min/max grid (no calibration data, no experts)."""

from epmq.quant.methods.base import Quantizer

RTN = Quantizer(
    "rtn", "merged", None, "rtn", "round-to-nearest on the min/max grid",
    label="RTN", order=10, colour="#7f7f7f",
)
