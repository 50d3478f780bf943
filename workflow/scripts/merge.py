"""Merge a suite's experts; hyperparameters in `select:` are chosen on the validation split."""

from epmq.pipeline import job, merge, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
m = sm.params.merge
with job(sm):
    spec = with_threads(sm.params.spec, sm.threads)
    merge(spec, sm.wildcards.merge, m["method"], m["params"], m["select"], sm.output.model,
          calib=sm.input.get("calib") or None)
