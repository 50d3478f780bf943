"""Draw the calibration batches of every task of a suite (train split, one seed)."""

from epmq.pipeline import calibrate, job, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    spec = with_threads(sm.params.spec, sm.threads)
    calibrate(spec, int(sm.wildcards.n), int(sm.wildcards.seed), sm.params.batch_size, sm.output[0])
