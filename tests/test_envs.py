"""The conda environment of the rules (envs/epmq.yaml, for `snakemake --sdm conda`), checked offline: it is
what `make lock` writes from requirements.lock, it parses, every entry is a pin (no relative path, which would
break in Snakemake's copy under .snakemake/conda/), every rule names it by a path that exists, and the docs use
Snakemake 9's flag. Building it needs conda and the conda-forge channel, which the test machines lack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "envs"))
import sync  # noqa: E402 (envs/sync.py)


def test_env_file_is_what_make_lock_writes():
    assert (ROOT / "envs" / "epmq.yaml").read_text() == sync.render(), "envs/epmq.yaml is stale: run `make lock`"
    r = subprocess.run([sys.executable, str(ROOT / "envs" / "sync.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_env_file_pins_everything_inline_with_no_relative_paths():
    env = yaml.safe_load((ROOT / "envs" / "epmq.yaml").read_text())
    assert env["name"] == "epmq" and "conda-forge" in env["channels"]
    deps = env["dependencies"]
    assert "pip" in deps and any(str(d).startswith("python=3.11") for d in deps)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    for entry in pip:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", entry), f"not a pin: {entry!r}"
    names = [e.split("==")[0].lower() for e in pip]
    assert len(names) == len(set(names)), "a package pinned twice"
    lock = {ln.split("==")[0].lower(): ln.strip() for ln in (ROOT / "requirements.lock").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    assert set(lock) <= set(names) and all(lock[n] in pip for n in lock)
    assert {"torch", "open_clip_torch", "snakemake"} <= set(names)


def test_every_rule_names_the_env_by_a_path_that_exists():
    rules = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
    seen = 0
    for f in rules:
        for m in re.finditer(r"conda:\s*\n\s*\"([^\"]+)\"", f.read_text()):
            assert (f.parent / m.group(1)).resolve() == ROOT / "envs" / "epmq.yaml", (f.name, m.group(1))
            seen += 1
    assert seen >= 8  # every rule that runs a script


def test_docs_use_snakemake_9_flag():
    for f in (ROOT / "README.md", ROOT / "envs" / "epmq.yaml", ROOT / "envs" / "sync.py"):
        text = f.read_text()
        assert "--sw-deployment-method" not in text, f.name
    assert "--software-deployment-method conda" in (ROOT / "README.md").read_text()
    help_text = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--help"], capture_output=True,
                               text=True).stdout
    assert "--software-deployment-method" in help_text and "--sdm" in help_text


def test_jobs_import_epmq_from_the_checkout():
    """A conda env does not install epmq: the Snakefile puts this checkout on the jobs' PYTHONPATH."""
    assert "epmq.config.put_on_jobs_path(workflow.basedir)" in (ROOT / "Snakefile").read_text()
    code = ("import os, epmq.config as c; os.environ['PYTHONPATH'] = 'a'; c.put_on_jobs_path('/ck'); "
            "c.put_on_jobs_path('/ck'); print(os.environ['PYTHONPATH'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [os.pathsep.join(["/ck", "a"])]
