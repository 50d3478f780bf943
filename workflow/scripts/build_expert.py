"""Fine-tune one task expert of a suite (encoder only, against the task's frozen head)."""

from epmq.pipeline import build_expert, job, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    build_expert(with_threads(sm.params.spec, sm.threads), sm.wildcards.task)
