"""Download / install (offline: check) the models and data a suite's jobs read; a local rule (login node)."""

from epmq.pipeline import fetch, log_to, with_threads

with log_to(snakemake.log[0]):  # noqa: F821 (snakemake is injected by the script directive)
    fetch(with_threads(snakemake.params.spec, snakemake.threads), snakemake.output[0])  # noqa: F821
