"""Pretrain (or load) a suite's base encoder and its frozen per-task heads."""

from epmq.pipeline import build_base, log_to, with_threads

with log_to(snakemake.log[0]):  # noqa: F821 (snakemake is injected by the script directive)
    build_base(with_threads(snakemake.params.spec, snakemake.threads))  # noqa: F821
