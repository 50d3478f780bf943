import re

import epmq.config
from epmq.identity import (
    Base,
    Calib,
    Expert,
    Merged,
    QuantRun,
    job_file,
    parse_model,
    render,
)
from epmq.pipeline import suite_spec

GRID = epmq.config.expand(config)
R = config["results"]
REPORTS = config["reports"]
THREADS = config["threads"]
DEVICE = config["device"]
CAL = config["calibration"]


def _alt(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    suite=_alt(GRID.suites),
    merge=_alt(GRID.merges),
    task=_alt({t for s in GRID.suites for t in GRID.tasks(s)}),
    quantizer=r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+=[^/]+)?",
    bits=r"\d+",
    group=r"-?\d+",
    seed=r"\d+",
    n=r"\d+",
    model=r"base|experts/[^/]+|merged/[^/]+",  # quantized models: evaluated by their quantize job


# suites whose models run on an accelerator outside quantization too: building zero-shot heads (base), scoring
# merge candidates on validation (merge) and evaluation; the embedded suites do all of that on the CPU
GPU_EVAL_SUITES = {"clip", "t5-glue"}


def suite_gpus(wildcards):
    """GPUs a base / merge / evaluate job asks for: a job granted none computes on the CPU (epmq.device)."""
    gpu_suite = GRID.suites[wildcards.suite]["type"] in GPU_EVAL_SUITES
    return 1 if gpu_suite and DEVICE != "cpu" else 0


# suites whose downloads need preprocessing (clip: decoding and resizing images; t5-glue: tokenizing): CPU work
# of minutes to hours, so it runs in its own job (rule preprocess, a cluster job) after the download (rule fetch,
# a local rule on the submit host); the embedded suites' fetch is a registry install of small data sets
PREPROCESS_SUITES = {"clip", "t5-glue"}


def preprocessed_later(wildcards):
    return GRID.suites[wildcards.suite]["type"] in PREPROCESS_SUITES


def fetched(wildcards):
    """What a suite's base job waits for: its downloads, and their preprocessing where the suite has one."""
    out = [f"{R}/{wildcards.suite}/fetched.json"]
    if preprocessed_later(wildcards):
        out.append(f"{R}/{wildcards.suite}/preprocessed.json")
    return out


def spec(wildcards):
    return suite_spec(GRID, wildcards.suite)


def experts_of(wildcards):
    return [Expert(wildcards.suite, t).weights(R) for t in GRID.tasks(wildcards.suite)]


def quant_run(wildcards):
    """The grid's quantized run a quantize job's wildcards name (epmq.identity parses them)."""
    return GRID.quant_run(QuantRun.from_wildcards(wildcards))


def quantize_inputs(w):
    """What a quantize job reads: the merged model and its merge record, the calibration batches and the
    experts when its method reads them, and the base (its job wrote the heads the evaluation reads).
    """
    from epmq.quant import METHODS

    run = quant_run(w)
    m = METHODS[run.method]
    merged = run.merged()
    out = {
        "merged": merged.weights(R),
        "merged_record": merged.record(R),
        "base": Base(w.suite).weights(R),
    }
    if m.needs_calibration:
        out["calib"] = run.calib(CAL["n_per_task"]).weights(R)
    if m.needs_experts:
        out["experts"] = experts_of(w)
    return out


def evaluate_inputs(wildcards):
    """What an evaluation reads: the weights (first: evaluate_ask sizes them), a merged model's merge record,
    and the base (its job wrote the heads)."""
    model = parse_model(wildcards.suite, wildcards.model)
    out = {"weights": model.weights(R)}
    if isinstance(model, (Merged, QuantRun)):
        out["record"] = model.record(R)
    if not isinstance(model, Base):
        out["base"] = Base(wildcards.suite).weights(R)
    return out


include: "resources.smk"
