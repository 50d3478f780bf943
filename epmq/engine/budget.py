"""The engine's memory-for-speed budgets: module constants, overridden by environment variables.

Neither budget changes what is computed beyond float summation order, so they are not part of a job's
parameters (a rule's ``params:``); they only trade memory for recomputation. :func:`cache_budget_mb` reads
the constant of this module at call time, so a test patches ``epmq.engine.budget.<NAME>``.
"""

from __future__ import annotations

import os

from epmq.errors import EPMQError

__all__ = ["EXPERT_CACHE_MB", "REUSE_CACHE_MB", "cache_budget_mb"]

#: largest total size (MiB) of one block's captured expert inputs kept in memory; beyond it, each group
#: re-runs the expert blocks instead (same numbers up to BLAS summation order, more compute). The environment
#: variable ``EPMQ_EXPERT_CACHE_MB`` overrides it (see :func:`cache_budget_mb`)
EXPERT_CACHE_MB = 4096


#: largest total size (MiB) of the sub-module outputs one block keeps for its later true-sequential passes
#: (:class:`epmq.engine.reuse.Reuse`); beyond it, further outputs are recomputed (same numbers, more compute).
#: 0: no reuse. The environment variable ``EPMQ_REUSE_CACHE_MB`` overrides it
REUSE_CACHE_MB = 2048


def cache_budget_mb(name: str) -> int:
    """The engine's memory-for-speed budget ``name`` (``"EXPERT_CACHE_MB"`` / ``"REUSE_CACHE_MB"``): the
    environment variable ``EPMQ_<name>`` if set (an integer >= 0), else the module constant. Neither changes
    what is computed beyond float summation order, so they are not part of a job's parameters."""
    if name not in ("EXPERT_CACHE_MB", "REUSE_CACHE_MB"):
        raise EPMQError(f"cache budget {name!r}: expected 'EXPERT_CACHE_MB' or 'REUSE_CACHE_MB'")
    env = f"EPMQ_{name}"
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return globals()[name]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise EPMQError(f"{env}={raw!r}: expected a whole number of MiB >= 0")
    return value
