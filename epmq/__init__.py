"""epmq: post-merge quantization (PMQ) of merged task experts.

Layers (never blurred):
  * numeric core: :mod:`epmq.merge` (merge methods) and :mod:`epmq.quant` (grid, RTN, GPTQ, E-PMQ,
    packed checkpoints) -- pure tensor functions;
  * model plumbing: :mod:`epmq.models` (architecture adapters) and :mod:`epmq.engine`
    (the layer-wise calibration engine);
  * orchestration: the Snakemake workflow and :mod:`epmq.cli`.

``import epmq`` is cheap: torch and friends are imported inside the modules that need them.
"""

__version__ = "0.1.0"

from epmq.errors import EPMQError  # noqa: E402  (light: no torch)

__all__ = ["EPMQError", "__version__"]
