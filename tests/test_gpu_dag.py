"""The local multi-GPU path, `snakemake --cores all --resources gpu=N` with `device: cuda`, run end to end on
mocked CUDA devices (tests/fakecuda: N devices, claimed with the real lock files, computing on the CPU).

configs/tiny.yaml runs once with 2 mocked devices; its quantize jobs (the GPU jobs) are then rerun with 1 and 4
devices. Each time: every GPU job claims exactly once, jobs that overlap in time hold distinct devices, no more
than N devices are used and, with N >= 2, jobs did run side by side; the leaderboard is the same for every N
and equals the CPU run's (tests/test_workflow.py's tiny run).
The paper's CLIP DAG on mocked GPUs is in tests/test_paper_dag.py (it reuses that module's CPU run)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FAKE = Path(__file__).resolve().parent / "fakecuda"


def _run(work: Path, n_gpus: int, *extra: str) -> list[dict]:
    """Snakemake on ``work`` with ``n_gpus`` mocked devices; the claim log's events."""
    log = work / f"claims-{n_gpus}.jsonl"
    env = dict(os.environ, EPMQ_FAKE_CUDA=str(n_gpus), EPMQ_FAKE_CUDA_LOG=str(log),
               EPMQ_LOCK_DIR=str(work / "locks"), EPMQ_GPU_WAIT_S="120",
               PYTHONPATH=os.pathsep.join(filter(None, [str(FAKE), os.environ.get("PYTHONPATH")])))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", "4", "--resources", f"gpu={n_gpus}", "--configfile", "tiny.yaml",
           "--config", "device=cuda", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=900)
    if r.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").rglob("*.log")))
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}\n{logs[-5000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()]


def _check_claims(events: list[dict], n_gpus: int) -> dict[int, tuple]:
    """Per GPU job (pid): (device index, claim time, exit time); asserts one claim per job and no overlap."""
    by_pid = defaultdict(list)
    for e in events:
        by_pid[e["pid"]].append(e)
    jobs = {}
    for pid, evs in by_pid.items():
        kinds = [e["event"] for e in evs]
        if "device" not in kinds:
            assert "claim" not in kinds, evs
            continue
        assert kinds.count("claim") == 1 and kinds.count("device") == 1, f"job claimed more than once: {evs}"
        assert kinds[-1] == "exit", evs
        dev = next(e for e in evs if e["event"] == "device")
        assert dev["job"].startswith("logs/quantize/"), f"only quantize jobs ask for a GPU here: {dev}"
        jobs[pid] = (dev["index"], dev["t"], evs[-1]["t"], dev["job"])
    assert jobs, "no GPU job ran"
    assert {j[0] for j in jobs.values()} <= set(range(n_gpus))
    spans = sorted(jobs.values(), key=lambda j: j[1])
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if b[1] < a[2]:  # b claimed before a exited: they ran at the same time
                assert a[0] != b[0], f"{a[3]} and {b[3]} held the same GPU {a[0]} at once"
    return jobs


def _leaderboard(work: Path) -> list[tuple]:
    rows = csv.DictReader((work / "reports-tiny" / "leaderboard.csv").open())
    keep = ("suite", "model", "expert_task", "merge", "method", "variant", "bits", "group_size", "seed",
            "task", "value", "n")
    return sorted(tuple(r.get(k, "") for k in keep) for r in rows)


def _concurrent(jobs: dict) -> int:
    """The most GPU jobs that held a device at the same moment."""
    edges = sorted([(j[1], 1) for j in jobs.values()] + [(j[2], -1) for j in jobs.values()])
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


@pytest.fixture(scope="module")
def gpu_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpudag")
    shutil.copy(ROOT / "configs" / "tiny.yaml", work / "tiny.yaml")
    return work


@pytest.mark.parametrize("n_gpus", [2, 1, 4])
def test_dag_on_mocked_gpus_claims_distinct_devices(gpu_work, n_gpus, tiny_run):
    if n_gpus != 2:  # the first run (2 devices) built everything; later ones redo the GPU jobs only
        if not (gpu_work / "reports-tiny" / "leaderboard.csv").exists():
            pytest.skip("needs the 2-device run")
        before = _leaderboard(gpu_work)
        for d in ("results-tiny/tiny-vit/quant", "results-tiny/tiny-vit/eval/quant", "reports-tiny"):
            shutil.rmtree(gpu_work / d)  # (the report too: Snakemake does not rerun for missing inputs alone)
    jobs = _check_claims(_run(gpu_work, n_gpus), n_gpus)
    assert len(jobs) == 9  # RTN, GPTQ, E-PMQ x 2 seeds + the ablation x 2 + the sweep point (seed 0)
    if n_gpus >= 2:
        assert _concurrent(jobs) >= 2, "GPU jobs never ran side by side"
        assert len({j[0] for j in jobs.values()}) >= 2
    if n_gpus != 2:
        assert _leaderboard(gpu_work) == before
    else:
        assert _leaderboard(gpu_work) == _leaderboard(tiny_run)  # the CPU run (tests/conftest.py)
    records = list((gpu_work / "results-tiny" / "tiny-vit" / "quant").rglob("*.json"))
    assert len(records) == 9

