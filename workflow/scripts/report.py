"""The leaderboard (CSV, Markdown, HTML, figures): a pure function of the run records."""

from pathlib import Path

from epmq.config import expand
from epmq.pipeline import job, report, run_meta

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    meta = run_meta(expand(sm.config))
    report(sm.input.evals, Path(sm.output.csv).parent, benchmarks=sm.input.benchmarks, meta=meta,
           anchors=sm.params.anchors)
