"""Fine-tune one task expert of a suite (encoder only, against the task's frozen head)."""

from epmq.pipeline import build_expert, log_to, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with log_to(sm.log[0]):
    build_expert(with_threads(sm.params.spec, sm.threads), sm.wildcards.task)
