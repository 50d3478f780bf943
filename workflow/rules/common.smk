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


# suites whose evaluation needs an accelerator (the embedded suites evaluate on CPU)
GPU_EVAL_SUITES = {"clip", "t5-glue"}


def eval_gpus(wildcards):
    gpu_suite = GRID.suites[wildcards.suite]["type"] in GPU_EVAL_SUITES
    return 1 if gpu_suite and DEVICE != "cpu" else 0


def spec(wildcards):
    return suite_spec(GRID, wildcards.suite)


def experts_of(wildcards):
    return expand(
        "{R}/{suite}/experts/{task}.safetensors",
        R=R,
        suite=wildcards.suite,
        task=GRID.tasks(wildcards.suite),
    )


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
