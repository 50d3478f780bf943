"""Evaluate one encoder on every task's test split (an expert: its own task); writes the run record."""

from epmq.identity import parse_model
from epmq.pipeline import evaluate, job, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    spec = with_threads(sm.params.spec, sm.threads)
    evaluate(spec, parse_model(sm.wildcards.suite, sm.wildcards.model), sm.input.weights, sm.output[0])
