"""Quantize a merged encoder (one quantizer / bit width / group size / calibration seed) and evaluate it."""

from pathlib import Path

from epmq.identity import QuantRun
from epmq.pipeline import QuantizeFiles, QuantizeOptions, job, quantize, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
run = QuantRun.from_wildcards(sm.wildcards)  # its sweep values' own types come with qcfg (the grid's)
with job(sm):
    quantize(
        with_threads(sm.params.spec, sm.threads), run, sm.params.qcfg,
        QuantizeFiles(merged=sm.input.merged, calib=sm.input.get("calib"),
                      out=Path(sm.output.record).with_suffix(".safetensors"),  # not written (save_weights=False)
                      evaluate_to=sm.output.eval),
        QuantizeOptions(n_calib=sm.params.n_calib, device=sm.params.device, save_weights=False),
    )
