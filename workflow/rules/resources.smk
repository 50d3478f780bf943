# Memory (mem_mb, MB) and wall time (runtime, minutes) of every cluster job: decided here, from what the job
# loads, and nowhere else (profiles/slurm sets no per-rule resources). On Slurm they become --mem and -t; a
# local run is limited by none of them unless it is given `--resources mem_mb=N`. Where the inputs tell what a
# job loads, the request is a function of their sizes (Snakemake passes `input`; while a file does not exist
# yet the value is "<TBD>", and it is computed once the job's inputs are there). A retried job (`retries:` in
# profiles/slurm: after an out-of-memory kill or a timeout) asks for `attempt` times as much memory and time.
#
# Sizes in MB: B = base.safetensors, M = the merged model, C = the calibration file, E = one expert (mean),
# W = the weights an evaluation reads. Headroom: Python + torch + numba + allocator slack.
#   expert    4 B + 2000        fine-tuning holds weights, gradients and two Adam moments (a clip / t5-glue
#                               expert job reads its hub checkpoint, about B)
#   merge     3 B + 2000        the merge is streamed tensor by tensor ((experts + 2) tensors at a time), so it
#                               holds the merged model and the model scored on validation, not every expert
#   quantize  2 M + 6 C + 2 E + 2000
#                               the model and the engine's working copy of one expert's blocks (2 M); the
#                               calibration batches, the hidden states propagated for the merged model and the
#                               experts, and the engine's caches, which grow with the calibration set (6 C);
#                               E-PMQ's expert blocks (2 E; methods without experts: 0; without calibration: C = 0).
#                               Checked against bench/README.md: ViT-B/32, 8 x 256 images (C = 1.2 GB):
#                               E-PMQ peak 7.9 GB on CPU, asks 10.6 GB; minilm E-PMQ 1.4 GB, asks 2.4 GB
#   evaluate  3 W + 2000        the weights, the model built from them, batches of the test sets
#   base, calibrate, preprocess: by suite type (SUITE_MEM_MB): what they read (hub caches, data/) is outside the
#                               DAG. clip: preprocessing holds one whole split as uint8 images (SUN397 at 224 px:
#                               3 GB) and its serialised copy; calibrating ViT-L/14 draws 20 x 256 float32 images
#                               (3.1 GB)
# Wall times (minutes) are generous upper bounds, GPU timings not being measured yet: expert 60 + B/5,
# merge 30 + B/5, quantize 60 + (M + C)/5, evaluate 30 + W/10, the others by suite type (SUITE_RUNTIME); all
# capped at 24 hours (a common partition limit: a request over a partition's MaxTime would wait forever).

import os

SUITE_MEM_MB = {"tiny-vit": 2000, "minilm": 4000, "clip": 16000, "t5-glue": 8000}
SUITE_RUNTIME = {"tiny-vit": 60, "minilm": 60, "clip": 480, "t5-glue": 240}
MAX_RUNTIME = 24 * 60


def _files(x):
    """The paths in ``x``: one path, or a (nested) list of them, as Snakemake's named inputs are."""
    return [x] if isinstance(x, str) else [p for item in x or [] for p in _files(item)]


def _mb(x):
    """Total size in MB of the files in ``x`` (a missing one raises FileNotFoundError: Snakemake then computes
    the resource again once the file exists)."""
    return sum(os.path.getsize(p) for p in _files(x)) / 2**20


def _mean_mb(x):
    files = _files(x)
    return _mb(files) / len(files) if files else 0.0


def _ask(mem_mb, minutes, attempt):
    return int(mem_mb * attempt), int(min(minutes * attempt, MAX_RUNTIME))


def by_suite(wildcards, input, attempt):
    t = GRID.suites[wildcards.suite]["type"]
    return _ask(SUITE_MEM_MB.get(t, 16000), SUITE_RUNTIME.get(t, 480), attempt)


def expert_ask(wildcards, input, attempt):
    b = _mb(input[0])
    return _ask(4 * b + 2000, 60 + b / 5, attempt)


def merge_ask(wildcards, input, attempt):
    b = _mb(input.base)
    return _ask(3 * b + 2000, 30 + b / 5, attempt)


def quantize_ask(wildcards, input, attempt):
    m, c = _mb(input.merged), _mb(input.get("calib"))
    e = _mean_mb(input.get("experts"))
    return _ask(2 * m + 6 * c + 2 * e + 2000, 60 + (m + c) / 5, attempt)


def evaluate_ask(wildcards, input, attempt):
    w = _mb(input.weights)
    return _ask(3 * w + 2000, 30 + w / 10, attempt)


def ask_mem(ask):
    """A rule's `mem_mb=` from one of the *_ask functions above."""

    def mem_mb(wildcards, input, attempt):
        return ask(wildcards, input, attempt)[0]

    return mem_mb


def ask_minutes(ask):
    """A rule's `runtime=` (minutes) from one of the *_ask functions above."""

    def runtime(wildcards, input, attempt):
        return ask(wildcards, input, attempt)[1]

    return runtime
