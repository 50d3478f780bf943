"""The old name of :mod:`epmq.engine` (the layer-wise calibration engine), kept so that existing code doing
``from epmq.calibrate import QuantConfig, quantize_model`` still runs. It holds no code: new code imports
from :mod:`epmq.engine`. (Not to be confused with :func:`epmq.pipeline.calibrate` and the workflow rule
``calibrate``, which draw the calibration batches.)"""

from __future__ import annotations

_OLD_NAMES = ("QuantConfig", "QuantizeReport", "quantize_model", "collect_stats", "cache_budget_mb")

__all__ = list(_OLD_NAMES)


def __getattr__(name):  # lazy, like epmq.engine: importing this module imports no torch
    if name in _OLD_NAMES:
        import epmq.engine

        return getattr(epmq.engine, name)
    raise AttributeError(f"module 'epmq.calibrate' has no attribute {name!r} (the engine is now epmq.engine)")
