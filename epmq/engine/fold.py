"""The statistics fold: each task's :class:`~epmq.quant.target.TaskStats` of a site, as soon as it is
collected, is folded with the task's expert weight into one :class:`~epmq.quant.target.FoldedStats` per site
(memory holds one task's Grams, not T of them), which the quantizer then plans from.

E-PMQ's target product ``[W_t b_t] C~_t`` of a layer with ``2 d_out <= d_in`` (an MLP's down projection) is
cheaper token by token (:func:`epmq.quant.target.direct_pays`): :func:`direct_weights` hands those layers'
expert weights to the statistics collection, and :func:`output_sites` tells the expert pass which inputs to
keep as those layers' expert outputs instead. ``direct_pays`` is read here only (a test patches it here).
"""

from __future__ import annotations

import torch

from epmq.engine.experts import expert_weight
from epmq.errors import check_finite
from epmq.models.adapters import Site
from epmq.quant.target import FoldedStats, TaskStats, augment_weight, direct_pays

__all__ = ["direct_weights", "fold", "fold_task", "new_fold", "output_sites"]


def new_fold(engine, cfg, site) -> FoldedStats:
    """An empty fold for ``site`` (pooled Gram only for a method that needs no experts)."""
    W = site.weight
    return FoldedStats(W.shape[0], W.shape[1], alpha=cfg.alpha, task_weighting=cfg.task_weighting, device=engine.device,
                       pooled_only=not cfg.spec.needs_experts)


def fold_task(engine, idx, site, folded: FoldedStats, t: int, stats: TaskStats, use_experts: bool) -> None:
    """Fold task ``t``'s statistics of ``site`` (block ``idx``) into ``folded``, with the task's expert weight
    where the method uses experts and the target product was not formed token by token."""
    prefix = engine.blocks[idx][0]
    direct = site.name in stats.N  # the target product is already there (see direct_weights)
    Wt, bt = (expert_weight(engine.experts, t, prefix, site, engine.device) if use_experts and not direct
              else (None, None))
    folded.add_task(stats, Wt, bt, name=f"{prefix}{site.name} task {t}", key=site.name)


def output_sites(sites: list[Site]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Input key -> ``(name, [W b])`` of its sites, for the inputs read only by layers whose E-PMQ target
    product is formed token by token (``direct_pays``)."""
    by_key: dict[str, list[Site]] = {}
    for s in sites:
        by_key.setdefault(s.input_key, []).append(s)
    return {k: [(s.name, augment_weight(s.weight.detach(), None if s.bias is None else s.bias.detach(),
                                        torch.float32)) for s in ss]
            for k, ss in by_key.items()
            if all(direct_pays(*s.weight.shape) for s in ss)}


def direct_weights(engine, idx, group, t: int) -> dict[str, torch.Tensor]:
    """Task ``t``'s augmented expert weights ``[W_t b_t]`` (float32) of the sites of ``group`` whose E-PMQ
    target product is cheaper token by token (:func:`epmq.quant.target.direct_pays`)."""
    prefix = engine.blocks[idx][0]
    out = {}
    for site in group:
        d_out, d_in = site.weight.shape
        if direct_pays(d_out, d_in):
            W, b = expert_weight(engine.experts, t, prefix, site, engine.device)
            check_finite(W, f"{prefix}{site.name} task {t} (expert weight)")
            out[site.name] = augment_weight(W, b, torch.float32)
    return out


def fold(engine, cfg, idx, site, per_task: list[dict[str, TaskStats]], use_experts: bool) -> FoldedStats:
    """``site``'s fold of precomputed per-task statistics (``fp`` propagation)."""
    folded = new_fold(engine, cfg, site)
    for t, stats in enumerate(per_task):
        fold_task(engine, idx, site, folded, t, stats[site.input_key], use_experts)
    return folded
