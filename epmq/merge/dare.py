"""DARE: Drop And REscale task vectors (Yu et al., arXiv 2311.03099).

Each entry of a task vector τ is dropped with probability ``p`` and the survivors are rescaled so that the
expectation is unchanged:

    m_i ~ Bernoulli(1 − p),    DARE(τ)_i = m_i · τ_i / (1 − p),    E[DARE(τ)] = τ.

DARE is not a merge on its own: it sparsifies the task vectors that task arithmetic or TIES then merge
(``dare_p`` hyperparameter of :func:`~epmq.merge.task_arithmetic.task_arithmetic` and
:func:`~epmq.merge.ties.ties`; FusionBench's DARE-TIES likewise drops first and then runs the full TIES,
magnitude trim included). ``p = 0`` returns τ itself, so a DARE variant with ``p = 0`` is bit-identical
to its base method.

Randomness is explicit: the mask is drawn from a ``torch.Generator`` seeded with ``seed``. The merge
driver gives every (tensor key, task) pair its own seed (:func:`epmq.merge.base.mix_seed`), so the masks
do not depend on the order tensors are visited in and a second pass over the model redraws the same ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epmq.errors import EPMQError

if TYPE_CHECKING:
    import torch


def check_dare_p(p: float) -> float:
    """``p`` must lie in [0, 1): p = 1 would drop everything and divide by zero."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise EPMQError(f"dare_p={p!r} is out of range: expected a drop probability in [0, 1)")
    return float(p)


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop each entry of ``tau`` with probability ``p``, rescale the rest by 1/(1−p); ``p = 0`` returns ``tau``."""
    import torch

    p = check_dare_p(p)
    if p == 0.0:
        return tau
    generator = torch.Generator(device=tau.device).manual_seed(seed)
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= p
    return tau * keep / (1.0 - p)
