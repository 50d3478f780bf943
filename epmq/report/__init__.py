"""The leaderboard: a pure function of the per-run evaluation JSONs (and, optionally, the Snakemake benchmark
TSVs of the quantize jobs).

* :func:`load_runs` reads and checks the run JSONs (schema 1), merging in benchmark cost;
* :func:`build_leaderboard` writes ``leaderboard.csv`` (tidy, one row per run × task × metric),
  ``leaderboard.md`` (methodology header + GPTQ-README-style pivot per suite, sweeps, cost),
  ``leaderboard.html`` (the same, self-contained, figures inlined) and ``figures/*.svg``; numbers quoted from
  the literature (``anchors``, :mod:`epmq.report.anchors`) get their own table per suite and CSV rows with
  ``origin`` = ``quoted``, and never enter an average, a mark, a Δ or a figure.

Everything is deterministic (stable sorts, fixed number formats, salted SVG ids, no dates) so regenerating
gives byte-identical files and a diff of the leaderboard is reviewable. Every file is written atomically.
``import epmq.report`` is cheap: matplotlib and numpy are imported only while drawing; torch never.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from epmq.errors import EPMQError
from epmq.report.names import MERGE_NAMES
from epmq.report.runs import check_unique, load_runs, normalize_run, read_benchmark

__all__ = ["METHOD_NAMES", "MERGE_NAMES", "build_leaderboard", "load_runs", "read_benchmark"]


def __getattr__(name):
    if name == "METHOD_NAMES":  # the quantizers' display names, read from the registry when asked for
        from epmq.report.names import method_names

        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_leaderboard(
    runs: Iterable[dict],
    out_dir: str | Path,
    *,
    meta: dict | None = None,
    figures: bool = True,
    anchors: dict | None = None,
) -> dict[str, Path]:
    """Write the leaderboard of ``runs`` (from :func:`load_runs`, or run dicts of schema 1) into ``out_dir``.

    ``meta`` feeds the methodology header (e.g. ``calibration``, ``seeds``, ``versions``, ``git_sha``,
    ``config``, ``command``, optional ``title``; other keys are listed as they are).
    ``anchors`` (the config's ``anchors:``, suite -> list of ``{label, source, model, merge, method, bits, value,
    tasks}``) are numbers quoted from the literature: shown per suite in their own table and as CSV rows with
    ``origin`` = ``quoted``, never in an Avg, mark, Δ or figure. None or ``{}``: the output has no trace of them.
    Returns ``{"csv": …, "md": …, "html": …, "figures/<name>.svg": …}`` (absolute-or-as-given paths).
    """
    from epmq.io import write_text_atomic
    from epmq.report.aggregate import collect
    from epmq.report.anchors import normalize_anchors
    from epmq.report.render import csv_text, html_page, markdown

    runs = [
        normalize_run(r, str(r.get("source") or f"runs[{i}]") if isinstance(r, dict) else f"runs[{i}]")
        for i, r in enumerate(runs)
    ]
    if not runs:
        raise EPMQError("build_leaderboard: no runs to report (the list of evaluation files is empty)")
    if meta is not None and not isinstance(meta, dict):
        raise EPMQError(f"build_leaderboard: meta={meta!r}: expected a dict")
    check_unique(runs)
    anchors = normalize_anchors(anchors)
    run_suites = sorted({r["suite"] for r in runs})
    for suite in anchors:
        if suite not in run_suites:
            raise EPMQError(f"anchors.{suite}: no runs of suite {suite!r} in this report (suites: {run_suites})")
    suites = collect(runs)

    out_dir = Path(out_dir)
    figs: dict[str, list] = {}  # suite -> [(caption, relative path, svg)]
    if figures:
        from epmq.report.figures import suite_figures
        from epmq.report.names import safe_name

        owners: dict[str, str] = {}
        for sd in suites:
            other = owners.setdefault(safe_name(sd.suite), sd.suite)
            if other != sd.suite:
                raise EPMQError(
                    f"suites {other!r} and {sd.suite!r} map to the same figure file name {safe_name(sd.suite)!r}"
                )
            figs[sd.suite] = [(caption, f"figures/{fname}", svg) for fname, caption, svg in suite_figures(sd)]

    written: dict[str, Path] = {}
    written["csv"] = write_text_atomic(out_dir / "leaderboard.csv", csv_text(runs, anchors))
    for suite_figs in figs.values():
        for _, rel, svg in suite_figs:
            written[rel] = write_text_atomic(out_dir / rel, svg)
    md_figs = {s: [(caption, rel) for caption, rel, _ in f] for s, f in figs.items()}
    written["md"] = write_text_atomic(out_dir / "leaderboard.md", markdown(suites, runs, meta, md_figs, anchors))
    written["html"] = write_text_atomic(out_dir / "leaderboard.html", html_page(suites, runs, meta, figs, anchors))
    return written
