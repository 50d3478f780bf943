"""The two walks over a model's blocks: :func:`quantize_model` (collect, fold, plan, round and write every
group of sites, block after block) and :func:`collect_stats` (the ``fp``-mode statistics of every site).

One :func:`quantize_model` run is a :class:`_Run` (the engine, the config, the report being filled, the
calibration streams or the precomputed statistics) handed to the per-block steps: :func:`_walk_block`
prepares a block (a later stack's inputs, the expert pass, the reuse cache) and :func:`_quantize_block` does
its groups in true-sequential order, then propagates past it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from epmq.engine.budget import cache_budget_mb
from epmq.engine.config import QuantConfig, QuantizeReport
from epmq.engine.fold import direct_weights, fold, fold_task, new_fold
from epmq.engine.reuse import Reuse
from epmq.engine.runner import Collect, Engine, EngineSetup, Streams
from epmq.errors import EPMQError
from epmq.models.adapters import Adapter, Site
from epmq.quant.result import QuantResult
from epmq.quant.target import FoldedStats, TaskStats

__all__ = ["collect_stats", "quantize_model"]


def quantize_model(
    model: nn.Module,
    calib: Sequence[Sequence] | None,
    cfg: QuantConfig,
    *,
    experts: Sequence[nn.Module | Mapping[str, torch.Tensor]] | None = None,
    adapter: Adapter | str | None = None,
    stats: Mapping[str, list[TaskStats]] | None = None,
    device=None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize every site of ``model`` in place (fake-quant weights) with ``cfg.method``.

    Args:
        model: the merged model (an architecture an adapter recognises).
        calib: per task, a list of calibration batches (``adapter.run(model, batch)`` accepts each);
            unused by RTN and in ``fp`` propagation with precomputed ``stats``.
        cfg: the method and its knobs.
        experts: per task, the expert (module or state-dict mapping with the model's keys); needed by
            methods that use expert targets or E-PMQ's Hessian.
        stats: precomputed ``fp``-mode statistics from :func:`collect_stats` (site full name -> per task).
        device: where to compute (default: CUDA if available, else CPU).

    Returns:
        a :class:`QuantizeReport` with the :class:`QuantResult` of every rounded weight (full state-dict names).
        A result's ``weight`` is the model's own weight tensor (the values just written), not a copy, when the
        layer is float32 on the compute device: the report adds only codes, scales and zeros to memory.
    """
    spec = cfg.spec
    report = QuantizeReport()
    t_start = time.perf_counter()
    use_experts = spec.needs_experts
    setup = EngineSetup(adapter, device, progress, cfg.method, cfg.forward_dtype, cfg.act_dtype, cfg.stats_dtype)
    engine = Engine(model, calib or [], experts if use_experts else None, setup)
    if use_experts and engine.experts is None:
        raise EPMQError(f"method {cfg.method!r} needs the experts (one per calibration task)")
    needs_data = spec.needs_calibration
    sequential = needs_data and stats is None
    if needs_data and stats is None and cfg.propagation == "fp":
        stats = collect_stats(model, calib, experts if use_experts else None, adapter=engine.adapter, device=device,
                              progress=progress, forward_dtype=cfg.forward_dtype, act_dtype=cfg.act_dtype,
                              stats_dtype=cfg.stats_dtype)
        sequential = False
    if stats is not None and use_experts:
        n_tasks = {len(v) for v in stats.values()}
        if n_tasks != {len(engine.experts)}:
            raise EPMQError(f"{len(engine.experts)} experts but statistics for {sorted(n_tasks)} tasks")
    if sequential and not calib:
        raise EPMQError(f"method {cfg.method!r} needs calibration batches")
    streams = engine.streams() if sequential else None
    run = _Run(engine, cfg, report, sequential, streams, stats)
    for idx in engine.bar():
        _walk_block(run, idx)
    report.seconds = time.perf_counter() - t_start
    return report


@dataclass(frozen=True)
class _Run:
    """What every block of one :func:`quantize_model` run shares. ``sequential``: the statistics are
    collected block by block from ``streams`` (the calibration calls into the current block); else they come
    from ``stats`` (``fp`` propagation), or the method needs none."""

    engine: Engine
    cfg: QuantConfig
    report: QuantizeReport
    sequential: bool
    streams: Streams | None
    stats: Mapping[str, list[TaskStats]] | None


def _walk_block(run: _Run, idx: int) -> None:
    """Prepare block ``idx`` (a later stack's inputs, the experts' inputs, the reuse cache) and quantize it."""
    engine, cfg = run.engine, run.cfg
    use_experts = cfg.spec.needs_experts
    block = engine.blocks[idx][1]
    if run.sequential and engine.starts_stack(idx):  # T5's decoder: its inputs come from the whole model
        engine.enter_stack(idx, run.streams, with_expert=use_experts)
    # the experts' inputs of this block, captured once for all groups (None: recompute per group)
    expert_inputs = (engine.expert_pass(idx, run.streams, outputs=cfg.alpha == 1.0)
                     if (run.sequential and use_experts) else None)
    groups = list(engine.adapter.find_linears(block))
    reuse = (Reuse(block, [s for g in groups for s in g])
             if run.sequential and cache_budget_mb("REUSE_CACHE_MB") > 0 else None)
    try:
        _quantize_block(run, idx, groups, expert_inputs, reuse)
    finally:
        if reuse is not None:
            reuse.close()


def _quantize_block(run: _Run, idx: int, groups: list[list[Site]], expert_inputs, reuse: Reuse | None) -> None:
    """Collect, solve, round and write every group of block ``idx`` in order, then propagate past it."""
    engine, cfg, report = run.engine, run.cfg, run.report
    prefix = engine.blocks[idx][0]
    for group in groups:
        folds = _collect_folds(run, idx, group, expert_inputs, reuse) if run.sequential else {}
        plans = [cfg.spec.plan(cfg, site, prefix + site.name, _folded(run, idx, site, folds)) for site in group]
        for plan, Q, bias, result, log in cfg.spec.round_group(cfg, plans):
            site, full = plan.site, plan.full
            _write(site, Q, bias)
            if reuse is not None:
                reuse.wrote(site)
            if result is not None:
                report.results[full] = _share_weight(result, site)
            if bias is not None:
                report.biases[prefix + site.bias_name] = bias
            report.layers.append(log)
    if run.sequential and not engine.starts_stack(idx + 1):  # a next stack re-captures its own inputs
        engine.propagate(idx, run.streams, with_expert=cfg.spec.needs_experts and expert_inputs is None, reuse=reuse)


def _collect_folds(run: _Run, idx: int, group: list[Site], expert_inputs,
                   reuse: Reuse | None) -> dict[str, FoldedStats]:
    """Site name -> its folded statistics, collected task by task from the calibration streams."""
    engine, cfg = run.engine, run.cfg
    use_experts = cfg.spec.needs_experts
    # each task's statistics are folded as soon as they are collected and then dropped: memory
    # holds one task's (d_in + 1)^2 Grams, not T of them (T = 20 at ViT-L/14: 2.7 GB at d_in 4096)
    folds = {site.name: new_fold(engine, cfg, site) for site in group}
    for t in range(len(engine.calib)):
        direct = direct_weights(engine, idx, group, t) if use_experts else None
        how = Collect(use_experts, expert_inputs, reuse, direct, cfg.alpha)
        task_stats = engine.group_stats(idx, group, run.streams, t, how)
        del direct, how
        for site in group:
            fold_task(engine, idx, site, folds[site.name], t, task_stats[site.input_key], use_experts)
        del task_stats
    return folds


def _folded(run: _Run, idx: int, site: Site, folds: dict[str, FoldedStats]) -> FoldedStats | None:
    """``site``'s folded statistics: collected (sequential), folded from the precomputed ``fp`` statistics, or
    None for a method that needs no calibration data."""
    if not run.cfg.spec.needs_calibration:
        return None
    if run.sequential:
        return folds[site.name]
    full = run.engine.blocks[idx][0] + site.name
    if full not in run.stats:
        raise EPMQError(f"statistics have no entry for {full!r}")
    per_task = [{site.input_key: s} for s in run.stats[full]]
    return fold(run.engine, run.cfg, idx, site, per_task, run.cfg.spec.needs_experts)


def _write(site: Site, Q: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The rounded weight (and refitted bias) into the layer, in its own dtype and device."""
    with torch.no_grad():
        w = site.weight
        w.data.copy_(Q.to(w.device, w.dtype))
        if bias is not None:
            site.bias.data.copy_(bias.to(site.bias.device, site.bias.dtype))


def _share_weight(result: QuantResult, site: Site) -> QuantResult:
    """``result`` whose fake-quant ``weight`` is the layer's own (just written, same values): no second copy
    of every quantized weight stays alive in the report (1.2 GB at ViT-L/14). Kept as it is when the layer
    holds another dtype or device than the result."""
    w = site.weight
    r = result.weight
    if w.dtype == r.dtype and w.device == r.device and w.shape == r.shape and torch.equal(w, r):
        result.weight = w.detach()
    return result


def collect_stats(
    model: nn.Module,
    calib: Sequence[Sequence],
    experts: Sequence | None = None,
    *,
    adapter: Adapter | str | None = None,
    device=None,
    progress: bool = True,
    forward_dtype: str = "fp32",
    act_dtype: str = "fp32",
    stats_dtype: str = "fp32",
) -> dict[str, list[TaskStats]]:
    """``fp``-mode statistics of every site (full state-dict name -> one :class:`TaskStats` per task), from
    the full-precision ``model`` and, if given, the experts' own inputs. Independent of the quantizer
    (``forward_dtype``/``act_dtype``/``stats_dtype``: see :class:`QuantConfig`). Nine parameters: public API
    whose keyword-only knobs mirror :func:`quantize_model`'s and :class:`QuantConfig`'s, each with a default."""
    setup = EngineSetup(adapter, device, progress, "collect", forward_dtype, act_dtype, stats_dtype)
    engine = Engine(model, calib, experts, setup)
    with_expert = experts is not None
    streams = engine.streams()
    out: dict[str, list[TaskStats]] = {}
    for idx in engine.bar():
        prefix, block = engine.blocks[idx]
        if engine.starts_stack(idx):
            engine.enter_stack(idx, streams, with_expert)
        sites = [s for g in engine.adapter.find_linears(block) for s in g]
        expert_inputs = engine.expert_pass(idx, streams) if with_expert else None
        how = Collect(with_expert, expert_inputs)
        per_task = [engine.group_stats(idx, sites, streams, t, how) for t in range(len(calib))]
        for s in sites:
            out[prefix + s.name] = [pt[s.input_key] for pt in per_task]
        if not engine.starts_stack(idx + 1):
            engine.propagate(idx, streams, with_expert and expert_inputs is None)
    return out
