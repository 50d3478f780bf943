"""What a quantizer is: :class:`Quantizer`, one object that owns everything about one method.

A quantizer says

* what it rounds, under which Hessian, with which rounding (``target`` / ``hessian`` / ``rounding``), and
  from that what it needs (:attr:`Quantizer.needs_experts`, :attr:`Quantizer.needs_calibration`) and which
  :class:`~epmq.engine.QuantConfig` knobs it reads (:attr:`Quantizer.knobs`);
* how it plans one site (:meth:`Quantizer.plan`: the target ``goal`` and Hessian ``H`` of a :class:`Plan`)
  and rounds a group of planned sites (:meth:`Quantizer.round_group`, which calls :meth:`Quantizer.round_sites`
  for the rounding itself and then refits biases and logs the layer errors);
* how the report shows it: ``label``, ``order`` (table order), ``colour`` (figures), ``ranked`` (False: not a
  quantized model, never marked best), ``baseline`` (the reference of the Δ columns: GPTQ) and ``headline``
  (the method whose Δ against the baseline the leaderboard shows: E-PMQ).

The calibration engine (:mod:`epmq.engine`) calls only ``plan`` and ``round_group``. A new rounding (GPTAQ,
...) subclasses :class:`Quantizer` and overrides :meth:`Quantizer.round_sites` (or ``round_group``); a new
target or Hessian overrides :meth:`Quantizer.plan`.

This module imports no torch at import time: the registry is read by the config validator and the report,
which run without it. The numeric code is imported inside ``plan`` / ``round_sites``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Quantizer", "QuantMethod", "Plan", "GRID_KNOBS", "CALIBRATION_KNOBS", "EXPERT_KNOBS", "SHARE_HESSIANS"]

#: the QuantConfig knobs every method reads (the grid), those of methods that use calibration data (GPTQ's
#: rounding, the propagation and its dtypes) and those of methods that use the experts (E-PMQ's target solve)
GRID_KNOBS = ("sym",)
CALIBRATION_KNOBS = ("act_order", "static_groups", "damp", "block_size", "propagation", "forward_dtype",
                     "act_dtype", "stats_dtype")
EXPERT_KNOBS = ("alpha", "lam_out", "lam_w", "task_weighting", "fit_bias")

#: round sites that share an input (q/k/v) in one stacked GPTQ call (one Hessian inverse); False rounds each
#: on its own (same numbers up to float rounding in the lazy block update)
SHARE_HESSIANS = True


@dataclass
class Plan:
    """One site's quantization problem: what GPTQ/RTN must round (``goal``) under which Hessian."""

    site: object  # epmq.models.adapters.Site
    full: str
    folded: object  # epmq.quant.target.FoldedStats | None
    W_m: object  # torch.Tensor
    target: object
    goal: object  # torch.Tensor
    H: object  # torch.Tensor | None
    log: dict
    seconds: float


_Plan = Plan  # the engine's historical name


@dataclass(frozen=True)
class Quantizer:
    """One quantization method: its meaning (target, Hessian, rounding), its paper and how it is displayed.

    ``target``: ``"merged"`` (round the merged weights W_m) or ``"epmq"`` (round E-PMQ's W*); ``hessian``:
    ``"pooled"`` (pooled X X^T), ``"epmq"`` (E-PMQ's task-balanced H) or None; ``rounding``: ``"rtn"``,
    ``"gptq"`` or None (keep the target unrounded)."""

    name: str
    target: str  # "merged" | "epmq"
    hessian: str | None  # "pooled" | "epmq" | None
    rounding: str | None  # "rtn" | "gptq" | None
    description: str
    paper: str = ""
    ablation: bool = False
    # display (the report)
    label: str = ""  # display name; the name itself when empty
    order: int = 1000  # table order (ascending); unknown methods come after every registered one
    colour: str = ""  # figure colour, "#rrggbb"
    ranked: bool = True  # False: not a quantized model, never marked "best quantized"
    baseline: bool = False  # the reference of the leaderboard's Δ columns (GPTQ)
    headline: bool = False  # the method whose Δ against the baseline the pivot table shows (E-PMQ)

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def needs_experts(self) -> bool:
        return self.target == "epmq" or self.hessian == "epmq"

    @property
    def needs_calibration(self) -> bool:
        return self.hessian is not None or self.target == "epmq"

    @property
    def knobs(self) -> tuple[str, ...]:
        """The QuantConfig knobs this method reads (``epmq.config.QUANT_KNOBS``; the others are ignored by it,
        so a change to them re-runs none of its jobs)."""
        out = GRID_KNOBS
        if self.needs_calibration:
            out += CALIBRATION_KNOBS
        if self.needs_experts:
            out += EXPERT_KNOBS
        return out

    # ------------------------------------------------------------------ the engine's two calls

    def plan(self, cfg, site, full_name: str, folded) -> Plan:
        """The goal and Hessian of one site (``cfg``: the run's QuantConfig; ``folded``: its FoldedStats, None
        when the method reads no calibration data)."""
        from epmq.quant.target import solve_target

        W_m = site.weight.detach().float()
        b_m = None if site.bias is None else site.bias.detach().float()
        log = {"layer": full_name, "d_out": W_m.shape[0], "d_in": W_m.shape[1]}
        t0 = time.perf_counter()
        target = None
        if self.target == "epmq" or self.hessian == "epmq":
            target = solve_target(
                folded, W_m, b_m, lam_out=cfg.lam_out, lam_w=cfg.lam_w, name=full_name,
                fit_bias=cfg.fit_bias and b_m is not None,  # a bias-free Linear (T5) keeps its architecture
            )
        goal = target.W_star if self.target == "epmq" else W_m
        if self.hessian == "pooled":
            H = folded.G_pool[:-1, :-1]
        elif self.hessian == "epmq":
            H = target.H
        else:
            H = None
        return Plan(site, full_name, folded, W_m, target, goal, H, log, time.perf_counter() - t0)

    def round_sites(self, cfg, plans: list[Plan]) -> dict:
        """Round the planned sites of one group: {index in ``plans``: QuantResult}; a site left out stays
        unrounded (its ``goal``). Each plan's ``seconds`` grows by its rounding time.

        Sites fed by the same input (q/k/v) have the same Hessian (E-PMQ's H does not depend on the weights):
        GPTQ rounds them in one stacked call (:func:`~epmq.quant.rounding.gptq_shared`: one Hessian inverse, one
        kernel per block)."""
        import torch

        from epmq.quant import rounding

        kw = dict(group_size=cfg.group_size, sym=cfg.sym)
        gkw = dict(act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size,
                   **kw)
        results: dict = {}
        if self.rounding == "gptq":
            buckets: dict[str, list[int]] = {}
            for i, p in enumerate(plans):
                buckets.setdefault(p.site.input_key, []).append(i)
            for idxs in buckets.values():
                # the same statistics give bitwise-equal Hessians; anything else is rounded on its own
                shared = [i for i in idxs if torch.equal(plans[i].H, plans[idxs[0]].H)]
                alone = [i for i in idxs if i not in shared]
                if SHARE_HESSIANS and len(shared) > 1:
                    t0 = time.perf_counter()
                    out = rounding.gptq_shared([plans[i].goal for i in shared], plans[shared[0]].H, cfg.bits,
                                               name=" + ".join(plans[i].full for i in shared), **gkw)
                    dt = (time.perf_counter() - t0) / len(shared)
                    for i, r in zip(shared, out):
                        results[i] = r
                        plans[i].seconds += dt
                else:
                    alone = idxs
                for i in alone:
                    t0 = time.perf_counter()
                    results[i] = rounding.gptq(plans[i].goal, plans[i].H, cfg.bits, name=plans[i].full, **gkw)
                    plans[i].seconds += time.perf_counter() - t0
        elif self.rounding == "rtn":
            for i, p in enumerate(plans):
                t0 = time.perf_counter()
                results[i] = rounding.rtn(p.goal, cfg.bits, name=p.full, **kw)
                p.seconds += time.perf_counter() - t0
        return results

    def round_group(self, cfg, plans: list[Plan]):
        """Round every planned site of a group (:meth:`round_sites`), refit E-PMQ's bias where asked and log the
        layer errors; yields (plan, weight, bias, result, log) in order."""
        results = self.round_sites(cfg, plans)
        for i, p in enumerate(plans):
            result = results.get(i)
            Q = result.weight if result is not None else p.goal.float()
            bias = None
            if cfg.fit_bias and self.target == "epmq" and p.target.b_star is not None:
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


QuantMethod = Quantizer  # the registry's historical name


def _quad(D, G) -> float:
    """tr(D G D^T) in float32, as the layer logs record it (:func:`epmq.quant.result.layer_error`)."""
    from epmq.quant.result import layer_error

    return layer_error(D, G, float32=True)
