"""Download / install (offline: check) the models and data a suite's jobs read: a local rule (on a cluster, the
submit host, which has internet where compute nodes may not). A hub suite's downloads are preprocessed by the
`preprocess` rule, a cluster job (`download_only`); an embedded suite's fetch installs small data sets.
The record is epmq.pipeline.fetch's."""

from epmq.io import write_json_atomic
from epmq.pipeline import job, open_suite, provenance, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with job(sm):
    suite = open_suite(with_threads(sm.params.spec, sm.threads))
    fetched = suite.prefetch(preprocess=False) if sm.params.download_only else suite.prefetch()
    write_json_atomic(sm.output[0], {"suite_type": sm.params.spec["type"], "fetched": fetched,
                                     "provenance": provenance()})
