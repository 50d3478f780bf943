"""Quantize a merged encoder with one quantizer / bit width / group size / calibration seed."""

from epmq.pipeline import log_to, quantize, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
with log_to(sm.log[0]):
    quantize(
        with_threads(sm.params.spec, sm.threads),
        sm.input.merged,
        sm.input.get("calib"),
        sm.params.qcfg,
        sm.output.model,
        seed=int(sm.wildcards.seed),
        n_calib=sm.params.n_calib,
        device=sm.params.device,
    )
