"""Pretrain (or load) a suite's base encoder and its frozen per-task heads."""

from epmq.pipeline import build_base, job, with_threads

with job(snakemake):  # noqa: F821 (snakemake is injected by the script directive)
    build_base(with_threads(snakemake.params.spec, snakemake.threads))  # noqa: F821
