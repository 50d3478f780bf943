"""Shared fixtures."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (tiny batches: as fast, and no oversubscription on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_snakemake(*args, cwd, env=None, timeout_s=1500):
    """``snakemake --snakefile <repo>/Snakefile --directory cwd *args`` in ``cwd``, stopped with SIGINT after
    ``timeout_s`` (Snakemake ignores SIGTERM while jobs run) and killed 15 s later; fails with the output's
    tail unless it exits 0."""
    cmd = ["timeout", "-s", "INT", "-k", "15", str(timeout_s), str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(cwd), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if r.returncode != 0:
        why = f"timed out after {timeout_s} s" if r.returncode in (124, 137) else f"exit {r.returncode}"
        raise AssertionError(f"{' '.join(cmd)} failed ({why}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml run end to end on the local machine (`snakemake --cores 2 --configfile tiny.yaml`) in a
    fresh folder; shared by the workflow tests and the Slurm test (its leaderboard is the reference)."""
    work = tmp_path_factory.mktemp("dag")
    shutil.copy(ROOT / "configs" / "tiny.yaml", work / "tiny.yaml")
    run_snakemake("--cores", "2", "--configfile", "tiny.yaml", cwd=work)
    return work
