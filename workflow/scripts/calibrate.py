"""Draw the calibration batches of every task of a suite (train split, one seed)."""

from epmq.identity import Calib
from epmq.pipeline import calibrate, job, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
cal = Calib.from_wildcards(sm.wildcards)
with job(sm):
    spec = with_threads(sm.params.spec, sm.threads)
    calibrate(spec, cal.n, cal.seed, sm.params.batch_size, sm.output[0])
