"""Quantize a merged encoder (one quantizer / bit width / group size / calibration seed) and evaluate it."""

from pathlib import Path

from epmq.pipeline import job, quantize, with_threads

sm = snakemake  # noqa: F821 (injected by the script directive)
w = sm.wildcards
with job(sm):
    quantize(
        with_threads(sm.params.spec, sm.threads), sm.input.merged, sm.input.get("calib"), sm.params.qcfg,
        Path(sm.output.record).with_suffix(".safetensors"),  # weights are not written (save_weights=False)
        seed=int(w.seed), n_calib=sm.params.n_calib, device=sm.params.device,
        save_weights=False, evaluate_to=sm.output.eval, suite_id=w.suite,
        model_id=f"quant/{w.merge}/{w.quantizer}/w{w.bits}g{w.group}/s{w.seed}",
    )
