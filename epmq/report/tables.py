"""The leaderboard's tables as plain data (:class:`Table` of :class:`Cell`), rendered to Markdown and HTML by
:mod:`epmq.report.render` from the same objects, so the two can never disagree."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from epmq.report.aggregate import EMPTY, Agg, Stat, SuiteData
from epmq.report.names import (
    DASH,
    MINUS,
    ablation_methods,
    baseline_method,
    bits_label,
    fmt_value,
    group_size_key,
    headline_method,
    main_methods,
    merge_label,
    method_name,
    method_rank,
    none_first,
    unranked_methods,
)

BEST_MARK = "\u2020"  # †


def delta_header() -> str:
    """The pivot's last column: the headline method minus the baseline, "Δ(E-PMQ − GPTQ)"."""
    return f"Δ({method_name(headline_method())} {MINUS} {method_name(baseline_method())})"


def _vs_baseline(what: str) -> str:
    """A column comparing with the baseline: "Δ vs GPTQ", "Time vs GPTQ"."""
    return f"{what} vs {method_name(baseline_method())}"


def __getattr__(name):
    if name == "DELTA_HEADER":  # the constant of earlier versions, now built from the registry's labels
        return delta_header()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Cell:
    text: str = DASH
    se: str | None = None  # standard error, shown as "(se)" after the text
    strong: bool = False
    best: bool = False
    num: bool = False  # right-aligned numeric cell


@dataclass
class Table:
    headers: list
    rows: list = field(default_factory=list)  # list[list[Cell]]
    row_classes: list = field(default_factory=list)  # per row: "ref", "block" (first of a block), ""
    caption: str = ""
    css_class: str = ""  # the HTML <table>'s class ("quoted" for numbers copied from the literature)

    def add(self, cells: list, cls: str = "") -> None:
        self.rows.append(cells)
        self.row_classes.append(cls)


def f1(x: float) -> str:
    return f"{x:.1f}"


def stat_cell(st: Stat, *, strong: bool = False) -> Cell:
    """``mean ± std (se)``; a single seed: ``mean (se)``; no data: "–"."""
    if st.mean is None:
        return Cell(num=True)
    text = f1(st.mean) if st.std is None else f"{f1(st.mean)} ± {f1(st.std)}"
    return Cell(text, None if st.se is None else f1(st.se), strong=strong, num=True)


def fmt_delta(d: float | None) -> str:
    """Signed, one decimal, typographic minus: "+8.6", "−1.2", "0.0"; "–" when undefined."""
    if d is None:
        return DASH
    s = f1(abs(d))
    if s == "0.0":
        return s
    return f"+{s}" if d > 0 else f"{MINUS}{s}"


def delta(a: Agg | None, b: Agg | None) -> float | None:
    if a is None or b is None or a.avg.mean is None or b.avg.mean is None:
        return None
    return a.avg.mean - b.avg.mean


def paired_delta(a: Agg | None, b: Agg | None) -> float | None:
    """``delta``, but when ``a`` ran on only some of ``b``'s seeds: the mean of the per-seed differences over the
    seeds both have (a one-seed sweep point is compared with the default's run on that seed, not its mean)."""
    if a is None or b is None:
        return None
    common = set(a.avg_by_seed) & set(b.avg_by_seed)
    if not common or set(a.avg_by_seed) == set(b.avg_by_seed):
        return delta(a, b)
    return sum(a.avg_by_seed[s] - b.avg_by_seed[s] for s in common) / len(common)


def _block_delta(a: Agg | None, b: Agg | None) -> str:
    """The main table's Δ of the headline method over the baseline. On the same seeds: the difference of the
    means. On different seed sets (a missing record, a method run on fewer seeds): the mean per-seed difference
    over the seeds both have, labelled with their count, so that no Δ compares different seed sets silently."""
    if a is None or b is None or set(a.avg_by_seed) == set(b.avg_by_seed):
        return fmt_delta(delta(a, b))
    common = set(a.avg_by_seed) & set(b.avg_by_seed)
    if not common:
        return DASH
    return f"{fmt_delta(paired_delta(a, b))} ({len(common)} seed{'s' if len(common) != 1 else ''})"


def _task_cells(agg: Agg | None, tasks: list) -> list:
    cells = [stat_cell(agg.cell(t) if agg else EMPTY) for t in tasks]
    return cells + [stat_cell(agg.avg if agg else EMPTY, strong=True)]


def _rounded(x: float) -> float:
    return float(f1(x))


def _seed_note(agg: Agg | None, max_seeds: int) -> str:
    if agg is None or all(s is None for s in agg.seeds) or len(agg.seeds) >= max_seeds:
        return ""
    n = len(agg.seeds)
    return f" ({n} seed{'s' if n != 1 else ''})"


def pivot_table(sd: SuiteData) -> Table:
    """Reference rows, then per merge setting, bit width and group size: RTN, GPTQ, E-PMQ and the ablations."""
    tasks = sd.tasks
    t = Table(["Method", "Merge", "Bits", *tasks, "Avg", delta_header()])
    t.add([Cell("Base (zero-shot)"), Cell(), Cell("FP"), *_task_cells(sd.base, tasks), Cell("")], "ref")
    t.add(
        [Cell("Experts (each on its own task)"), Cell(), Cell("FP"), *_task_cells(sd.experts, tasks), Cell("")], "ref"
    )
    for mk in sd.merge_keys:
        label = merge_label(mk[0], sd.merge_params[mk], with_params=True)
        t.add([Cell("FP merged"), Cell(label), Cell("FP"), *_task_cells(sd.fp.get(mk), tasks), Cell("")], "ref")

    defaults = sd.quant_keys(default=True)
    max_seeds = max((len(sd.quant[k].seeds) for k in defaults), default=0)
    main, unranked, base, head = main_methods(), unranked_methods(), baseline_method(), headline_method()
    for mk in sd.merge_keys:
        mlabel = merge_label(mk[0], sd.merge_params[mk], with_params=sd.show_params(mk[0]))
        blocks = sorted(
            {(k[2], k[3]) for k in defaults if k[0] == mk}, key=lambda b: (none_first(b[0]), group_size_key(b[1]))
        )
        for bits, gs in blocks:
            present = sorted({k[1] for k in defaults if k[0] == mk and k[2] == bits and k[3] == gs}, key=method_rank)
            # a bit width always shows the three headline methods ("–" if absent); ablations only when present
            methods = [*main, *(m for m in present if m not in main)] if bits is not None else present
            aggs = {m: sd.quant.get((mk, m, bits, gs, "")) for m in methods}
            ranked = [
                aggs[m].avg.mean
                for m in methods
                if m not in unranked and aggs[m] and aggs[m].avg.mean is not None
            ]
            best = max(map(_rounded, ranked)) if ranked else None
            for i, m in enumerate(methods):
                agg = aggs[m]
                cells = [Cell(method_name(m) + _seed_note(agg, max_seeds)), Cell(mlabel), Cell(bits_label(bits, gs))]
                cells += _task_cells(agg, tasks)
                if agg and best is not None and m not in unranked and agg.avg.mean is not None:
                    cells[-1].best = _rounded(agg.avg.mean) == best
                d = _block_delta(agg, aggs.get(base)) if m == head else ""
                cells.append(Cell(d, num=True))
                t.add(cells, "block" if i == 0 else "")
    return t


def _variant_sort_key(variant: dict) -> tuple:
    return tuple(
        (k, (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, fmt_value(v)))
        for k, v in sorted(variant.items())
    )


def sweep_clusters(sd: SuiteData) -> list:
    """[(merge key, bits, group size, method, [variant strings sorted by value])] for the sweep table/figure."""
    clusters: dict = {}
    for mk, m, bits, gs, var in sd.quant_keys(default=False):
        clusters.setdefault((mk, bits, gs, m), []).append(var)
    out = []
    for key in sorted(clusters, key=lambda c: (c[0], none_first(c[1]), group_size_key(c[2]), method_rank(c[3]))):
        out.append((*key, sorted(clusters[key], key=lambda v: _variant_sort_key(sd.variants[v]))))
    return out


def default_setting(sd: SuiteData, qk: tuple, keys) -> str:
    """The default row's label, e.g. "default (lam_w=0.01)": the swept keys' values as recorded in the default
    runs' quant_params."""
    qp = sd.quant_params.get(qk, {})
    known = [f"{k}={fmt_value(qp[k])}" for k in sorted(keys) if k in qp]
    return f"default ({', '.join(known)})" if known else "default"


def sweep_table(sd: SuiteData) -> Table | None:
    clusters = sweep_clusters(sd)
    if not clusters:
        return None
    base = baseline_method()
    t = Table(["Merge", "Bits", "Method", "Setting", "Avg", "Δ vs default", _vs_baseline("Δ")])
    for mk, bits, gs, m, variants in clusters:
        mlabel = merge_label(mk[0], sd.merge_params[mk], with_params=sd.show_params(mk[0]))
        blabel = bits_label(bits, gs)
        ref = sd.quant.get((mk, base, bits, gs, ""))
        dflt = sd.quant.get((mk, m, bits, gs, ""))
        keys = {k for v in variants for k in sd.variants[v]}
        first = "block"
        if m != base:
            t.add(
                [
                    Cell(mlabel),
                    Cell(blabel),
                    Cell(method_name(base)),
                    Cell("default"),
                    stat_cell(ref.avg if ref else EMPTY),
                    Cell("", num=True),
                    Cell("", num=True),
                ],
                first,
            )
            first = ""
        t.add(
            [
                Cell(mlabel),
                Cell(blabel),
                Cell(method_name(m)),
                Cell(default_setting(sd, (mk, m, bits, gs, ""), keys)),
                stat_cell(dflt.avg if dflt else EMPTY),
                Cell("", num=True),
                Cell(fmt_delta(delta(dflt, ref)) if m != base else "", num=True),
            ],
            first,
        )
        for v in variants:
            agg = sd.quant[(mk, m, bits, gs, v)]
            t.add(
                [
                    Cell(mlabel),
                    Cell(blabel),
                    Cell(method_name(m)),
                    Cell(v.replace(",", ", ") + _seed_note(agg, len(dflt.seeds) if dflt else 0)),
                    stat_cell(agg.avg),
                    Cell(fmt_delta(paired_delta(agg, dflt)), num=True),
                    Cell(fmt_delta(paired_delta(agg, ref)), num=True),
                ]
            )
    return t


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mb(x: float) -> str:
    """A size in MB to 2 significant digits at least: 0.034, 0.42, 5.3, 88."""
    return f"{x:.2g}" if x < 1 else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def cost_table(sd: SuiteData) -> Table | None:
    """Median quantize time, peak RSS and GPU memory per method (default settings), the ratios to the baseline's
    (GPTQ), and the size on disk of the packed low-bit checkpoint per bit width (per-row scales)."""
    runs = [r for r in sd.runs if r["model"] == "quantized" and not r["variant"]]
    if not runs:
        return None
    methods = sorted({r["method"] for r in runs}, key=method_rank)
    med = {
        m: {
            k: _median(r["cost"].get(k) for r in runs if r["method"] == m)
            for k in ("quantize_seconds", "peak_rss_mb", "gpu_mb")
        }
        for m in methods
    }
    g = med.get(baseline_method(), {})

    def ratio(m, k):
        a, b = med[m][k], g.get(k)
        return Cell(DASH if a is None or not b else f"{a / b:.2f}×", num=True)

    def num(x, fmt):
        return Cell(DASH if x is None else format(x, fmt), num=True)

    # the packed checkpoint's size depends on the bit width (and group size), not on the method's settings:
    # one median per bit width of the per-row-scale runs, e.g. "0.42 / 0.55 / 0.68" for 2 / 3 / 4 bits
    bits = sorted({r["bits"] for r in runs if r["bits"] is not None})

    def packed(m):
        sizes = [_median(r["cost"].get("packed_mb") for r in runs
                         if r["method"] == m and r["bits"] == b and r["group_size"] in (None, -1, 0)) for b in bits]
        if all(x is None for x in sizes):
            return Cell(DASH, num=True)
        return Cell(" / ".join(DASH if x is None else _mb(x) for x in sizes), num=True)

    t = Table(
        [
            "Method",
            "Runs",
            "Quantize time, median (s)",
            _vs_baseline("Time"),
            "Peak RSS, median (MB)",
            _vs_baseline("RSS"),
            "GPU memory, median (MB)",
            f"Packed MB ({' / '.join(map(str, bits))} bits)",
        ]
    )
    for m in methods:
        n = sum(1 for r in runs if r["method"] == m)
        t.add(
            [
                Cell(method_name(m)),
                Cell(str(n), num=True),
                num(med[m]["quantize_seconds"], ".1f"),
                ratio(m, "quantize_seconds"),
                num(med[m]["peak_rss_mb"], ".0f"),
                ratio(m, "peak_rss_mb"),
                num(med[m]["gpu_mb"], ".0f"),
                packed(m),
            ]
        )
    return t


# ---------------------------------------------------------------------------------------------- the header

_META_LABELS = {
    "calibration": "Calibration",
    "seeds": "Seeds",
    "versions": "Versions",
    "git_sha": "Git SHA",
    "config": "Config",
    "command": "Command",
}
_CODE_KEYS = {"git_sha", "config", "command"}


def _meta_value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_meta_value(x)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0])))
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=str) if isinstance(v, (set, frozenset)) else v
        return ", ".join(_meta_value(x) for x in items)
    return fmt_value(v)


def _unranked_note() -> str:
    """The Marks line's last sentence: which rows are never marked (they are not quantized models)."""
    names = [f"*{method_name(m)}*" for m in sorted(unranked_methods(), key=method_rank)]
    if not names:
        return ""
    if len(names) == 1:
        return f" {names[0]} is not a quantized model and is never marked."
    return f" {', '.join(names[:-1])} and {names[-1]} are not quantized models and are never marked."


def methodology(runs: list[dict], *, quoted: bool = False) -> list[tuple]:
    """The fixed explanation of the numbers: [(label, text)] (with ``quoted``: how quoted numbers are shown)."""
    ablations = "; ".join(f"*{method_name(m)}*" for m in ablation_methods())
    head, base = method_name(headline_method()), method_name(baseline_method())
    main = [method_name(m) for m in main_methods()]
    main = ", ".join(main[:-1]) + " and " + main[-1] if len(main) > 1 else "".join(main)
    extra = []
    if quoted:
        extra.append(
            (
                "Quoted numbers",
                "the tables *Quoted from the literature (not reproduced here)* copy published numbers (label and "
                "source on every row); they were not produced by this workflow, may use other models, test sets "
                "and evaluation code, and never enter an Avg, a mark, a Δ or a figure. The CSV has them as rows "
                "with `origin` = `quoted`.",
            )
        )
    other = sorted({(r["suite"], t, rec["metric"]) for r in runs for t, rec in r["tasks"].items()
                    if rec.get("metric") not in (None, "accuracy")})
    if other:  # t5-glue: STS-B's cell is Spearman's rho x 100 (FusionBench's metric), averaged like the others
        extra.append(("Other metrics", "these cells hold another metric (× 100) in place of accuracy, enter Avg "
                      "like the others and carry their own standard error: "
                      + "; ".join(f"{s} {t}: {m}" for s, t, m in other) + "."))
    return [
        (
            "Metric",
            "top-1 accuracy (%) on each task's test split; **Avg** is the unweighted mean over the suite's "
            "tasks, computed per seed before aggregating (a run lacking a task gets no Avg).",
        ),
        (
            "Cells",
            "`mean ± std (se)`: mean and sample standard deviation (n−1) over the calibration seeds of the "
            "same (merge, method, bits, group size, setting); a single run shows `mean (se)`. "
            "`se` is the binomial standard error of the test-set estimate, √(p(1−p)/n), averaged over seeds; "
            "for Avg it is √(Σₜ seₜ²)/T. All seeds share one test set, so averaging seeds does not shrink se: "
            "differences below about 2·se are within test-set noise.",
        ),
        (
            "Marks",
            f"every Avg is bold; {BEST_MARK} marks the best Avg (at the displayed precision, ties all marked) "
            "among the quantized rows of one (merge, bits, group size) block." + _unranked_note(),
        ),
        (
            delta_header(),
            f"mean Avg of {head} minus mean Avg of {base} in the same block, in accuracy points "
            f"(negative when {head} loses); where the two ran on different seeds, the mean per-seed difference "
            "over the seeds both have, followed by their count, e.g. `+1.2 (2 seeds)`.",
        ),
        (
            "Rows",
            "reference rows first: the base model zero-shot, each expert on its own task (the diagonal), "
            "the full-precision merged model per merge method with its chosen hyperparameters; then per merge "
            f'method, bit width and group size {main} at their default settings ("–" = not run) '
            f"and the ablations present: {ablations}. Bits `4` = one scale per output row, `4 · g64` = groups "
            "of 64 input columns; `(2 seeds)` after a method = fewer seeds than the other rows. "
            "Hyperparameter sweep points are in their own table.",
        ),
        (
            "Packed MB",
            "the cost table's size on disk of the packed low-bit checkpoint a run ships (`epmq quantize --packed`: "
            "integer codes packed to the bit width, float32 scales and zeros, every other tensor as it is, and its "
            "config), per bit width; the GPTQ export is this size within fp16 scale rounding.",
        ),
        *extra,
    ]


def meta_items(meta: dict | None) -> list[tuple]:
    """[(label, text, is_code)] from the caller's ``meta``: known keys first in a fixed order, then the rest."""
    meta = dict(meta or {})
    meta.pop("title", None)
    keys = [k for k in _META_LABELS if k in meta] + sorted(k for k in meta if k not in _META_LABELS)
    out = []
    for k in keys:
        if meta[k] is None:
            continue
        label = _META_LABELS.get(k, str(k).replace("_", " ").capitalize())
        out.append((label, _meta_value(meta[k]), k in _CODE_KEYS))
    return out


def data_items(runs: list[dict]) -> list[tuple]:
    """[(label, text, is_code)] read from the runs themselves, so the header cannot drift from the data."""

    def distinct(values):
        vals = sorted({v for v in values if v is not None}, key=str)
        return vals

    suites = distinct(r["suite"] for r in runs)
    seeds = distinct(r["seed"] for r in runs)
    n_calib = distinct(r["n_calib"] for r in runs)
    items = [("Evaluation files", f"{len(runs)} (suites: {', '.join(suites)})", False)]
    if seeds:
        items.append(("Calibration seeds in the data", ", ".join(map(str, seeds)), False))
    if n_calib:
        items.append(("Calibration examples per task (n_calib) in the data", ", ".join(map(str, n_calib)), False))
    for key, label in (("epmq", "epmq versions"), ("torch", "torch versions"), ("git_sha", "Git SHAs")):
        vals = distinct(r["provenance"].get(key) for r in runs)
        if vals:
            text = ", ".join(map(str, vals)) + (" (mixed: runs come from different builds)" if len(vals) > 1 else "")
            items.append((f"{label} in the data", text, key == "git_sha"))
    return items


def suite_summary(sd: SuiteData) -> str:
    sizes = ", ".join(f"{t} {'/'.join(map(str, n))}" for t, n in sd.test_sizes.items())
    return f"{len(sd.tasks)} tasks; test examples per task: {sizes or DASH}; {len(sd.runs)} evaluation files."
