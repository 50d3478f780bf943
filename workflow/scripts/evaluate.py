"""Evaluate one encoder on every task's test split (an expert: its own task); writes the run record."""

from epmq.pipeline import evaluate, job, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    spec = with_threads(sm.params.spec, sm.threads)
    evaluate(spec, sm.wildcards.suite, sm.wildcards.model, sm.input[0], sm.output[0])
