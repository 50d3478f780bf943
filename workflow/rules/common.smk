import re

import epmq.config
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
    return expand(
        "{R}/{suite}/experts/{task}.safetensors",
        R=R,
        suite=wildcards.suite,
        task=GRID.tasks(wildcards.suite),
    )


def merge_calib(w):
    """A data-aware merge's calibration file (the first calibration seed's; train split), else nothing."""
    return GRID.merge_calib(w.suite, w.merge) or []


def needs(quantizer):
    from epmq.quant import METHODS

    return METHODS[quantizer.split(".")[0]]


def quantize_inputs(w):
    m = needs(w.quantizer)
    out = {"merged": f"{R}/{w.suite}/merged/{w.merge}.safetensors"}
    if m.needs_calibration:
        out["calib"] = f"{R}/{w.suite}/calib/n{CAL['n_per_task']}_s{w.seed}.safetensors"
    if m.needs_experts:
        out["experts"] = experts_of(w)
    return out


def weights_of(wildcards):
    """The weights (and their JSON record) an evaluation reads."""
    m = wildcards.model
    if m == "base":
        return [f"{R}/{wildcards.suite}/base.safetensors"]
    if m.startswith("experts/"):
        return [f"{R}/{wildcards.suite}/{m}.safetensors"]
    return [f"{R}/{wildcards.suite}/{m}.safetensors", f"{R}/{wildcards.suite}/{m}.json"]


include: "resources.smk"
