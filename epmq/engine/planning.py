"""What the quantizer does with a site's folded statistics: plan its problem (target, Hessian) and round a
group of planned sites (GPTQ with shared Hessians, RTN), plus the float32 diagnostics of the layer log.

Moved here unchanged from the former ``epmq.calibrate`` as one module, so that the quantizer plug-ins
(which own planning and rounding) can replace it in one place: the engine calls only :func:`_plan` and
:func:`_quantize_group`. ``SHARE_HESSIANS``, ``gptq`` and ``gptq_shared`` are read here (tests patch them here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from epmq.engine.config import QuantConfig
from epmq.models.adapters import Site
from epmq.quant.rounding import gptq, gptq_shared, rtn
from epmq.quant.target import FoldedStats, solve_target

#: round sites that share an input (q/k/v) in one stacked GPTQ call (one Hessian inverse); False rounds each
#: on its own (same numbers up to float rounding in the lazy block update)
SHARE_HESSIANS = True


@dataclass
class _Plan:
    """One site's quantization problem: what GPTQ/RTN must round (``goal``) under which Hessian."""

    site: Site
    full: str
    folded: FoldedStats | None
    W_m: torch.Tensor
    target: object
    goal: torch.Tensor
    H: torch.Tensor | None
    log: dict
    seconds: float


def _plan(cfg: QuantConfig, site: Site, full_name: str, folded: FoldedStats | None) -> _Plan:
    spec = cfg.spec
    W_m = site.weight.detach().float()
    b_m = None if site.bias is None else site.bias.detach().float()
    log = {"layer": full_name, "d_out": W_m.shape[0], "d_in": W_m.shape[1]}
    t0 = time.perf_counter()
    target = None
    if spec.target == "epmq" or spec.hessian == "epmq":
        target = solve_target(
            folded, W_m, b_m, lam_out=cfg.lam_out, lam_w=cfg.lam_w, name=full_name,
            fit_bias=cfg.fit_bias and b_m is not None,  # a bias-free Linear (T5) keeps its architecture
        )
    goal = target.W_star if spec.target == "epmq" else W_m
    if spec.hessian == "pooled":
        H = folded.G_pool[:-1, :-1]
    elif spec.hessian == "epmq":
        H = target.H
    else:
        H = None
    return _Plan(site, full_name, folded, W_m, target, goal, H, log, time.perf_counter() - t0)


def _quantize_group(cfg: QuantConfig, plans: list[_Plan]):
    """Round every planned site of a group; yields (plan, weight, bias, result, log) in order.

    Sites fed by the same input (q/k/v) have the same Hessian (E-PMQ's H does not depend on the weights):
    GPTQ rounds them in one stacked call (:func:`gptq_shared`: one Hessian inverse, one kernel per block)."""
    spec = cfg.spec
    kw = dict(group_size=cfg.group_size, sym=cfg.sym)
    gkw = dict(act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size,
               **kw)
    results: dict[int, QuantResult] = {}
    if spec.rounding == "gptq":
        buckets: dict[str, list[int]] = {}
        for i, p in enumerate(plans):
            buckets.setdefault(p.site.input_key, []).append(i)
        for idxs in buckets.values():
            # the same statistics give bitwise-equal Hessians; anything else is rounded on its own
            shared = [i for i in idxs if torch.equal(plans[i].H, plans[idxs[0]].H)]
            alone = [i for i in idxs if i not in shared]
            if SHARE_HESSIANS and len(shared) > 1:
                t0 = time.perf_counter()
                out = gptq_shared([plans[i].goal for i in shared], plans[shared[0]].H, cfg.bits,
                                  name=" + ".join(plans[i].full for i in shared), **gkw)
                dt = (time.perf_counter() - t0) / len(shared)
                for i, r in zip(shared, out):
                    results[i] = r
                    plans[i].seconds += dt
            else:
                alone = idxs
            for i in alone:
                t0 = time.perf_counter()
                results[i] = gptq(plans[i].goal, plans[i].H, cfg.bits, name=plans[i].full, **gkw)
                plans[i].seconds += time.perf_counter() - t0
    elif spec.rounding == "rtn":
        for i, p in enumerate(plans):
            t0 = time.perf_counter()
            results[i] = rtn(p.goal, cfg.bits, name=p.full, **kw)
            p.seconds += time.perf_counter() - t0
    for i, p in enumerate(plans):
        result = results.get(i)
        Q = result.weight if result is not None else p.goal.float()
        bias = None
        if cfg.fit_bias and spec.target == "epmq" and p.target.b_star is not None:
            bias = p.target.refit_bias(Q)
            if result is not None:
                result.bias = bias
        log = p.log
        log["seconds"] = p.seconds
        if p.folded is not None:  # diagnostics, in float32 (logs only; float64 cost as much as the solve)
            G = p.folded.G_pool[:-1, :-1].float()
            log["rel_err_merged"] = _quad(Q - p.W_m, G) / max(_quad(p.W_m, G), 1e-30)
            if p.target is not None:
                log["epmq_objective"] = _quad(Q - p.target.W_star, p.target.H.float())
        yield p, Q, bias, result, log


def _quad(D: torch.Tensor, G: torch.Tensor) -> float:
    """tr(D G D^T)."""
    D = D.float()
    return float(((D @ G) * D).sum())
