"""Preprocess what `fetch` downloaded for a hub suite (clip: decoded, resized uint8 images; t5-glue: token ids)
into its data/ caches: a cluster job after the local download. It reads the local caches only, so it runs
offline unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say otherwise; its record is fetch's, made again offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from epmq.io import write_json_atomic  # noqa: E402 (the HF libraries read the variables once)
from epmq.pipeline import job, open_suite, provenance, with_threads  # noqa: E402

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    suite = open_suite(with_threads(sm.params.spec, sm.threads))
    fetched = suite.prefetch(preprocess=True)  # checks the caches, then writes every split's data file
    write_json_atomic(sm.output[0], {"suite_type": sm.params.spec["type"], "fetched": fetched,
                                     "provenance": provenance()})
