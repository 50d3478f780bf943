"""The workflow on a real Slurm cluster: configs/tiny.yaml through snakemake-executor-plugin-slurm with the
shipped profile, exactly as the README documents it (`snakemake --workflow-profile profiles/slurm`), against a
single-node cluster this test starts (tests/slurm/cluster.sh: munged, slurmctld, slurmd; partitions `cpu` and
`gpu` on the one node, which declares one stand-in GPU). Checked: every job but the local rules ran as a Slurm
job, in the partition its GPU need calls for, with the memory and time the rules ask for, and the leaderboard
equals the local run's (tests/conftest.py's tiny_run) number for number.

Skipped, with the reason, where the daemons are not installed or cannot start (not root, no Debian packages:
`apt-get install --no-install-recommends slurmctld slurmd slurm-client munge`); .ci/run installs them and sets
EPMQ_REQUIRE_SLURM=1, which turns such a skip into a failure. The profile checks need no cluster."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, run_snakemake

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
PROFILE = ROOT / "profiles" / "slurm"
# Flags for this test cluster only: it has no accounting database (job status from squeue; the cluster keeps
# finished jobs for MinJobAge = 3600 s), and its jobs take seconds (first status check after 5 s, not 40)
TEST_CLUSTER_FLAGS = ("--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5")
LOCAL_RULES = {"fetch", "report", "all"}
# leaderboard columns that describe the run, not its numbers
RUN_COLUMNS = {"quantize_seconds", "peak_rss_mb", "gpu_mb", "epmq_version", "torch_version", "git_sha"}
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def _say(config, line: str) -> None:
    """A line in pytest's output even while output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def _unavailable(reason: str):
    if os.environ.get("EPMQ_REQUIRE_SLURM") == "1":
        pytest.fail(f"EPMQ_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, request):
    """A running single-node Slurm cluster (tests/slurm/cluster.sh), stopped when the test run ends."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        _unavailable(f"Slurm is not installed (missing {', '.join(missing)}; Debian: apt-get install -y "
                     "--no-install-recommends slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        _unavailable("the test cluster's slurmd must run as root")
    folder = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=60)
        _unavailable(f"the Slurm daemons did not start (cluster.sh exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    _say(request.config, f"\nSlurm test cluster up in {time.perf_counter() - t0:.1f} s ({folder})")
    yield folder
    subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=60)


def _slurm_snakemake(work: Path, *args, timeout_s: int):
    return run_snakemake("--workflow-profile", PROFILE, *args, *TEST_CLUSTER_FLAGS, cwd=work, timeout_s=timeout_s)


def _run_id(output: str) -> str:
    (uuid,) = re.findall(r"SLURM run ID: (\S+)", output)
    return uuid


def _slurm_jobs(run_id: str) -> list[dict]:
    """Every job of one Snakemake run as Slurm's controller lists it (`scontrol show job`; the plugin names
    each job after the run ID and comments it with its rule and wildcards)."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.strip()]
    return [j for j in jobs if j.get("JobName") == run_id]


def _rule(job: dict) -> str:
    return re.match(r"rule_(.+?)(_wildcards_.*)?$", job["Comment"]).group(1)


def _job_stats(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table: jobs per rule of the run."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    stats.pop("total", None)
    return {k: int(v) for k, v in stats.items()}


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory, request):
    """configs/tiny.yaml run through Slurm in a fresh folder, as the README documents it."""
    work = tmp_path_factory.mktemp("slurmdag")
    shutil.copy(ROOT / "configs" / "tiny.yaml", work / "tiny.yaml")
    t0 = time.perf_counter()
    r = _slurm_snakemake(work, "--configfile", "tiny.yaml", timeout_s=1800)
    wall = time.perf_counter() - t0
    output = r.stdout + r.stderr
    run = SimpleNamespace(work=work, output=output, wall=wall, stats=_job_stats(output),
                          jobs=_slurm_jobs(_run_id(output)))
    _say(request.config, f"Slurm run of configs/tiny.yaml: {len(run.jobs)} Slurm jobs + "
                         f"{sum(n for k, n in run.stats.items() if k in LOCAL_RULES)} local, {wall:.0f} s wall")
    return run


def test_every_job_but_the_local_rules_ran_as_a_slurm_job(slurm_run):
    expected = {k: n for k, n in slurm_run.stats.items() if k not in LOCAL_RULES}
    ran = {}
    for j in slurm_run.jobs:
        ran[_rule(j)] = ran.get(_rule(j), 0) + 1
    assert ran == expected, (ran, slurm_run.stats)
    assert sum(expected.values()) >= 15  # base, 2 experts, merge, 2 calibrations, 9 quantize, 4 evaluate
    for j in slurm_run.jobs:
        assert j["JobState"] == "COMPLETED", j
        # tiny.yaml says device: cpu, so no job asks for a GPU and every one goes to the CPU partition
        assert j["Partition"] == "cpu" and "gpu" not in j.get("TresPerJob", ""), j
        # memory and wall time come from the rules (workflow/rules/resources.smk), never left unset
        assert j["TimeLimit"] != "UNLIMITED" and int(j["MinMemoryNode"].rstrip("M")) >= 2000, j
    # every job wrote its own log (logs/<rule>/...), the local ones too
    logs = {rule: len(list((slurm_run.work / "logs" / rule).rglob("*.log"))) for rule in slurm_run.stats}
    assert {k: v for k, v in logs.items() if k != "all"} == {k: v for k, v in slurm_run.stats.items() if k != "all"}


def test_merge_memory_follows_the_base_size(slurm_run):
    """The merge asks for 3 x base + 2000 MB (streamed merge), not a constant and not the experts' sum."""
    base_mb = (slurm_run.work / "results-tiny" / "tiny-vit" / "base.safetensors").stat().st_size / 2**20
    (merge,) = [j for j in slurm_run.jobs if _rule(j) == "merge"]
    assert merge["MinMemoryNode"] == f"{int(3 * base_mb + 2000)}M"


def _leaderboard(work: Path) -> list[dict]:
    rows = list(csv.DictReader((work / "reports-tiny" / "leaderboard.csv").open()))
    return [{k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows]


def test_slurm_leaderboard_equals_the_local_runs(slurm_run, tiny_run):
    on_slurm, local = _leaderboard(slurm_run.work), _leaderboard(tiny_run)
    assert len(on_slurm) == len(local) > 0
    assert on_slurm == local


def test_a_gpu_job_goes_to_the_gpu_partition_with_one_gpu(slurm_run):
    """With `device: auto` quantize asks for gpu=1: Slurm gives it the node's stand-in GPU in partition `gpu`
    (torch finds no CUDA there and the job computes on the CPU)."""
    cfg = yaml.safe_load((slurm_run.work / "tiny.yaml").read_text())
    cfg["device"] = "auto"
    (slurm_run.work / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    target = "results-tiny/tiny-vit/quant/task_arithmetic/rtn/w3g-1/s0.json"
    r = _slurm_snakemake(slurm_run.work, target, "--configfile", "gpu.yaml", timeout_s=600)  # target first
    (job,) = _slurm_jobs(_run_id(r.stdout + r.stderr))
    assert _rule(job) == "quantize" and job["JobState"] == "COMPLETED", job
    assert job["Partition"] == "gpu" and job["TresPerJob"] == "gres:gpu:1", job


# ------------------------------------------------------------------ the profile (no cluster needed)


def _effective(monkeypatch, *argv):
    from snakemake.cli import parse_args

    monkeypatch.chdir(ROOT)
    return parse_args(list(argv))[1]


@pytest.mark.parametrize("argv", [("--workflow-profile", "profiles/slurm"), ("--profile", "profiles/slurm")],
                         ids=["workflow-profile", "profile"])
def test_slurm_profile_settings_are_in_force(argv, monkeypatch):
    """The documented `--workflow-profile profiles/slurm` replaces profiles/default; `--profile profiles/slurm`
    runs under profiles/default, which wins key by key, so that profile sets no key the Slurm one contradicts."""
    args = _effective(monkeypatch, *argv)
    assert args.executor == "slurm" and args.jobs == 100
    assert args.latency_wait == 60 and args.rerun_incomplete and args.retries == 1
    assert Path(args.slurm_partition_config).resolve() == PROFILE / "partitions.yaml"
    # resources, threads and GPUs are the rules' (workflow/rules/resources.smk): nothing overrides them
    assert not args.set_resources and not args.set_threads and args.default_resources is None


def test_default_profile_contradicts_no_cluster_setting(monkeypatch):
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert {k: v for k, v in default.items() if k in slurm and slurm[k] != v} == {}
    assert "latency-wait" not in default and "keep-going" not in default
    args = _effective(monkeypatch)  # a plain run: profiles/default
    assert args.executor is None and args.rerun_incomplete and args.latency_wait == 5


def test_partition_file_sends_gpu_jobs_to_gpu_partitions_only():
    """profiles/slurm/partitions.yaml read and scored by the plugin itself, for a GPU and a CPU job."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    partitions = read_partition_file(PROFILE / "partitions.yaml")
    log = logging.getLogger("test_slurm")

    def best(gpu):
        job = SimpleNamespace(name="quantize", threads=2, resources={"gpu": gpu, "mem_mb": 10000, "runtime": 300})
        return get_best_partition(partitions, job, log)

    assert best(1) == "gpu" and best(0) == "cpu"
