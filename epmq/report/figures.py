"""SVG figures (matplotlib, imported only here and only when called): accuracy vs bits, the anchor/α sweep and a
per-task heatmap. Byte-identical on regeneration: fixed hash salt, no date, text as paths, no pyplot state."""

from __future__ import annotations

import io
import math

from epmq.report.aggregate import Agg, SuiteData
from epmq.report.names import (
    baseline_method,
    bits_label,
    group_size_key,
    merge_label,
    method_colour,
    method_name,
    method_rank,
    none_first,
    safe_name,
)
from epmq.report.tables import sweep_clusters

_RC = {
    "svg.hashsalt": "epmq",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "path.simplify": False,
}
_OTHER_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939")
_BITS_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 8: "#2ca02c"}


def _method_color(method: str, others: list) -> str:
    """A registered quantizer's own colour (:attr:`epmq.quant.Quantizer.colour`), else one of the others'."""
    own = method_colour(method)
    if own is not None:
        return own
    return _OTHER_COLORS[others.index(method) % len(_OTHER_COLORS)]


def _bits_color(bits, i: int) -> str:
    return _BITS_COLORS.get(bits, _OTHER_COLORS[i % len(_OTHER_COLORS)])


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue().decode("utf-8")


def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure manager, no backend switching

    return Figure(figsize=(w, h), layout="constrained")


def _legend(fig, axes, *, below: bool = True, rank=None) -> None:
    """One legend for all facets (first handle per label), optionally reordered by ``rank(label)``."""
    seen, items = set(), []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                items.append((h, lab))
    if rank is not None:
        items = sorted(items, key=lambda it: rank(it[1]))  # stable: ties keep drawing order
    if not items:
        return
    handles, labels = zip(*items)
    if below:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(items)), fontsize=8, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def _avg(agg: Agg | None):
    return None if agg is None else agg.avg.mean


def accuracy_vs_bits(sd: SuiteData) -> str | None:
    """Avg vs bits, one line per (method, group size), a facet per merge setting, FP references as lines."""
    defaults = sd.quant_keys(default=True)
    mks = [mk for mk in sd.merge_keys if any(k[0] == mk for k in defaults)]
    bits_all = sorted({k[2] for k in defaults if k[2] is not None})
    if not mks:
        return None
    xpos = {b: i for i, b in enumerate(bits_all)}
    others = sorted({k[1] for k in defaults if method_colour(k[1]) is None})
    fig = _new_figure(max(3.8 * len(mks), 6.0), 3.9)
    axes = fig.subplots(1, len(mks), sharey=True, squeeze=False)[0]
    for ax, mk in zip(axes, mks):
        refs = [
            (_avg(sd.fp.get(mk)), "FP merged", "-", "black"),
            (_avg(sd.experts), "Experts (own task), mean", "-.", "#555555"),
            (_avg(sd.base), "Base (zero-shot)", ":", "#555555"),
        ]
        for y, label, ls, color in refs:
            if y is not None:
                ax.axhline(y, ls=ls, color=color, lw=1.0, label=label)
        series = sorted(
            {(k[1], k[3]) for k in defaults if k[0] == mk}, key=lambda s: (method_rank(s[0]), group_size_key(s[1]))
        )
        for method, gs in series:
            color = _method_color(method, others)
            grouped = group_size_key(gs)[0] == 1
            label = method_name(method) + (f" (g{gs})" if grouped else "")
            pts = [(k[2], sd.quant[k]) for k in defaults if k[0] == mk and k[1] == method and k[3] == gs]
            unbitted = [a for b, a in pts if b is None and a.avg.mean is not None]
            for a in unbitted:  # e.g. the unrounded target: no bit width, a reference level
                ax.axhline(a.avg.mean, ls=(0, (4, 2)), color=color, lw=1.2, label=label)
            pts = sorted(((b, a) for b, a in pts if b is not None and a.avg.mean is not None), key=lambda p: p[0])
            if not pts:
                continue
            ax.errorbar(
                [xpos[b] for b, _ in pts],
                [a.avg.mean for _, a in pts],
                yerr=[a.avg.std or 0.0 for _, a in pts],
                color=color,
                ls="--" if grouped else "-",
                marker="s" if grouped else "o",
                ms=4,
                lw=1.4,
                capsize=3,
                label=label,
            )
        ax.set_title(merge_label(mk[0], sd.merge_params[mk], with_params=True))
        ax.set_xticks(range(len(bits_all)), [str(b) for b in bits_all])
        ax.set_xlim(-0.4, max(len(bits_all) - 0.6, 0.4))
        ax.set_xlabel("bits")
        ax.grid(True, axis="y", color="#e0e0e0", lw=0.6)
    axes[0].set_ylabel("Avg accuracy (%)")
    _legend(fig, axes)
    fig.suptitle(f"{sd.suite}: Avg accuracy vs bits (error bars: std over seeds)")
    return _svg(fig)


def _heat_rows(sd: SuiteData) -> list:
    rows = [("Base (zero-shot)", sd.base), ("Experts (own task)", sd.experts)]
    rows += [(f"FP {merge_label(mk[0], sd.merge_params[mk], with_params=True)}", sd.fp.get(mk)) for mk in sd.merge_keys]
    for k in sd.quant_keys(default=True):
        mk, method, bits, gs, _ = k
        mlabel = merge_label(mk[0], sd.merge_params[mk], with_params=sd.show_params(mk[0]))
        rows.append((f"{mlabel} · {method_name(method)} · {bits_label(bits, gs)}", sd.quant[k]))
    return [(label, agg) for label, agg in rows if agg is not None]


def heatmap(sd: SuiteData) -> str | None:
    """Per-task accuracy (mean over seeds), rows = reference rows + default-setting quantized groups; + Avg."""
    import numpy as np

    rows = _heat_rows(sd)
    if not rows:
        return None
    cols = [*sd.tasks, "Avg"]
    M = np.full((len(rows), len(cols)), np.nan)
    for i, (_, agg) in enumerate(rows):
        for j, t in enumerate(sd.tasks):
            if agg.cell(t).mean is not None:
                M[i, j] = agg.cell(t).mean
        if agg.avg.mean is not None:
            M[i, -1] = agg.avg.mean
    fig = _new_figure(3.6 + 0.75 * len(cols), 1.3 + 0.27 * len(rows))
    ax = fig.subplots()
    finite = M[np.isfinite(M)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            if math.isnan(v):
                ax.text(j, i, "\u2013", ha="center", va="center", fontsize=7, color="#444444")
            else:
                dark = (v - lo) / (hi - lo) < 0.55
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                    fontweight="bold" if j == len(cols) - 1 else "normal",
                )
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7.5)
    ax.axvline(len(cols) - 1.5, color="white", lw=2.5)
    ax.tick_params(length=0)
    fig.colorbar(im, ax=ax, label="accuracy (%)", shrink=0.9)
    ax.set_title(f"{sd.suite}: per-task test accuracy (mean over seeds)")
    return _svg(fig)


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def anchor_sweep(sd: SuiteData) -> str | None:
    """Avg vs each swept value (single-key numeric variants), one line per bit width; the baseline (GPTQ) as a
    dashed level."""
    facets: dict = {}  # (mk, method, key) -> {(bits, gs): [(x, agg, is_default)]}
    for mk, bits, gs, method, variants in sweep_clusters(sd):
        for v in variants:
            var = sd.variants[v]
            if len(var) != 1:
                continue
            ((key, x),) = var.items()
            if not _numeric(x):
                continue
            facets.setdefault((mk, method, key), {}).setdefault((bits, gs), []).append(
                (float(x), sd.quant[(mk, method, bits, gs, v)], False)
            )
    if not facets:
        return None
    for (mk, method, key), lines in facets.items():  # the default run sits on the curve when its value is known
        for (bits, gs), pts in lines.items():
            qk = (mk, method, bits, gs, "")
            dv = sd.quant_params.get(qk, {}).get(key)
            if qk in sd.quant and _numeric(dv):
                pts.append((float(dv), sd.quant[qk], True))
    keys = sorted(facets, key=lambda f: (f[0], method_rank(f[1]), f[2]))
    base = baseline_method()  # GPTQ: drawn as a dashed level in every facet
    base_label = method_name(base)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig = _new_figure(max(3.8 * ncol, 6.0), 3.1 * nrow + 0.8)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    for ax, (mk, method, key) in zip(axes, keys):
        lines = facets[(mk, method, key)]
        xs_all = [x for pts in lines.values() for x, a, _ in pts if a.avg.mean is not None]
        for i, (bits, gs) in enumerate(sorted(lines, key=lambda b: (none_first(b[0]), group_size_key(b[1])))):
            color = _bits_color(bits, i)
            blabel = bits_label(bits, gs) + (" bits" if bits is not None else "")
            pts = sorted((p for p in lines[(bits, gs)] if p[1].avg.mean is not None), key=lambda p: p[0])
            if pts:
                ax.errorbar(
                    [x for x, _, _ in pts],
                    [a.avg.mean for _, a, _ in pts],
                    yerr=[a.avg.std or 0.0 for _, a, _ in pts],
                    color=color,
                    marker="o",
                    ms=4,
                    lw=1.4,
                    capsize=3,
                    label=f"{method_name(method)}, {blabel}",
                )
                for x, a, is_default in pts:
                    if is_default:
                        ax.plot([x], [a.avg.mean], marker="*", ms=11, color=color, ls="none", label="default setting")
            dflt = sd.quant.get((mk, method, bits, gs, ""))
            if dflt is not None and dflt.avg.mean is not None and not any(d for _, _, d in pts):
                ax.axhline(dflt.avg.mean, color=color, ls=":", lw=1.0, label=f"{method_name(method)} default, {blabel}")
            ref = sd.quant.get((mk, base, bits, gs, ""))
            if method != base and ref is not None and ref.avg.mean is not None:
                ax.axhline(ref.avg.mean, color=color, ls="--", lw=1.0, alpha=0.8, label=f"{base_label}, {blabel}")
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("Avg accuracy (%)")
        ax.set_title(
            f"{merge_label(mk[0], sd.merge_params[mk], with_params=sd.show_params(mk[0]))} · {method_name(method)}"
        )
        ax.grid(True, color="#e0e0e0", lw=0.6)
    _legend(
        fig,
        axes[: len(keys)],
        rank=lambda lab: 2 if lab == "default setting" else 1 if lab.startswith(f"{base_label}, ") else 0,
    )
    fig.suptitle(f"{sd.suite}: hyperparameter sweep (error bars: std over seeds)")
    return _svg(fig)


def suite_figures(sd: SuiteData) -> list[tuple]:
    """[(file name, caption, svg text)] for one suite, in a fixed order; figures without data are skipped."""
    import matplotlib

    name = safe_name(sd.suite)
    out = []
    with matplotlib.rc_context(_RC):
        for stem, caption, fn in (
            ("accuracy_vs_bits", "Avg accuracy vs bits", accuracy_vs_bits),
            ("anchor_sweep", "Hyperparameter sweep", anchor_sweep),
            ("heatmap", "Per-task accuracy", heatmap),
        ):
            svg = fn(sd)
            if svg is not None:
                out.append((f"{stem}_{name}.svg", f"{caption}: {sd.suite}", svg))
    return out
