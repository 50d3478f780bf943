"""The paper's DAG (configs/paper/vit-b32-8tasks.yaml's shape: a ``clip`` suite, task arithmetic, RTN / GPTQ /
E-PMQ) run end to end on stand-ins with the real architectures and file layouts, fully offline: a random tiny
``CLIPModel`` saved by ``save_pretrained`` (the base), perturbed ``CLIPVisionModel`` experts (one in the older
``vision_model.``-prefixed key layout) and tiny image datasets saved with ``save_to_disk`` in the hub schema
(``image`` + ``label`` ClassLabel). Snakemake runs with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` and an
empty ``HF_HOME`` of its own, so nothing real is read or downloaded."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_suite_clip import _dataset, _expert, _tiny_clip  # noqa: E402 (the suite test's stand-in builders)

import epmq.config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUITE = "clip-tiny"
TASKS = ["mnist", "eurosat"]


def _config(world: Path, experts: dict) -> dict:
    """configs/paper/vit-b32-8tasks.yaml scaled down to the stand-ins (paths absolute, CPU, 1 thread)."""
    return {
        "results": "results",
        "reports": "reports",
        "threads": 1,
        "device": "cpu",
        "suites": {SUITE: {"type": "clip", "options": {
            "base": str(world / "base"),
            "experts": experts,
            "datasets": {t: str(world / f"ds_{t}") for t in TASKS},
            "tasks": TASKS,
            "image_size": 32,  # the tiny model's vision_config.image_size
            "n_val": 4,
            "calib_pool": 12,
            "eval_batch_size": 16,
            "precision": "fp32",
            "device": "cpu",
            "progress": False,
        }}},
        "merges": {"task_arithmetic": {"params": {"lam": 0.3}}},
        "quantize": {
            "methods": ["rtn", "gptq", "epmq"],
            "bits": [4],
            "group_size": [-1],
            "params": {"damp": 0.01, "block_size": 128, "alpha": 1.0, "lam_w": 0.01, "lam_out": 0.0,
                       "task_weighting": "trace", "propagation": "sequential"},
        },
        "calibration": {"n_per_task": 8, "seeds": [0], "batch_size": 8},
    }


def _env(world: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(world / "hf_home"))
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(k, None)  # everything under the private HF_HOME
    return env


def _snakemake(work: Path, world: Path, *args, check=True):
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=_env(world), timeout=600)
    if check and r.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((work / "logs").rglob("*.log")))
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{logs[-6000:]}")
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The stand-ins: base, 2 experts (eurosat's in the prefixed layout), 2 datasets with train + test."""
    root = tmp_path_factory.mktemp("paperworld")
    base = _tiny_clip(root / "base")
    _expert(base, root / "exp_mnist", 1)
    _expert(base, root / "exp_eurosat", 2, prefixed=True)
    _dataset(root / "ds_mnist", "mnist", 24, 12, 0)  # train 24 >= n_val 4 + calib_pool 12 >= n_per_task 8
    _dataset(root / "ds_eurosat", "eurosat", 20, 10, 1)
    (root / "hf_home").mkdir()
    return root


@pytest.fixture(scope="module")
def paper_run(world, tmp_path_factory):
    work = tmp_path_factory.mktemp("paperdag")
    cfg = _config(world, {t: str(world / f"exp_{t}") for t in TASKS})
    epmq.config.validate(copy.deepcopy(cfg))  # fills defaults in place: the file keeps the short form
    (work / "paper.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _snakemake(work, world, "--cores", "2", "--configfile", "paper.yaml")
    return work


def test_dag_runs_offline_and_fetch_records_the_sources(paper_run, world):
    fetched = json.loads((paper_run / "results" / SUITE / "fetched.json").read_text())
    assert fetched["suite_type"] == "clip"
    assert fetched["fetched"]["models"] == [str(world / "base"), *(str(world / f"exp_{t}") for t in TASKS)]
    assert fetched["fetched"]["datasets"] == {t: str(world / f"ds_{t}") for t in TASKS}
    data = paper_run / "results" / SUITE / "data"
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.safetensors")) == sorted(
        f"{t}/{s}.safetensors" for t in TASKS for s in ("test", "train", "validation"))
    experts = paper_run / "results" / SUITE / "experts"
    for t in TASKS:
        assert json.loads((experts / f"{t}.json").read_text())["relative_delta"] > 0
    # nothing was downloaded into (or read from) the private HF cache
    hub = world / "hf_home" / "hub"
    assert not hub.exists() or not any(hub.glob("models--*"))


def test_leaderboard_has_every_model_and_equals_the_run_records(paper_run):
    cfg = yaml.safe_load((paper_run / "paper.yaml").read_text())
    epmq.config.validate(cfg)
    grid = epmq.config.expand(cfg)
    targets = grid.eval_targets(SUITE)
    records = {m: json.loads((paper_run / "results" / SUITE / "eval" / f"{m}.json").read_text()) for m in targets}
    kinds = sorted((r["model"], r["expert_task"] or "", r["method"] or "") for r in records.values())
    assert kinds == sorted([("base", "", ""), ("expert", "eurosat", ""), ("expert", "mnist", ""),
                            ("merged", "", ""), ("quantized", "", "epmq"), ("quantized", "", "gptq"),
                            ("quantized", "", "rtn")])
    rows = list(csv.DictReader((paper_run / "reports" / "leaderboard.csv").open()))
    # every model on every task, except that an expert is evaluated on its own task only
    assert len(rows) == sum(1 if r["model"] == "expert" else len(TASKS) for r in records.values())
    assert all(r["suite"] == SUITE and r["metric"] == "accuracy" and r["task"] in TASKS for r in rows)

    def key(model, expert_task, method, seed, task):
        return (model, expert_task or "", method or "", "" if seed is None else str(seed), task)

    by_key = {}
    for r in rows:
        k = key(r["model"], r["expert_task"], r["method"], r["seed"] or None, r["task"])
        assert k not in by_key, k
        by_key[k] = r
    for m, rec in records.items():
        for t in ([rec["expert_task"]] if rec["model"] == "expert" else TASKS):
            row = by_key[key(rec["model"], rec["expert_task"], rec["method"], rec["seed"], t)]
            assert float(row["value"]) == pytest.approx(rec["tasks"][t]["accuracy"], abs=0.01), (m, t)
            assert int(row["n"]) == rec["tasks"][t]["n"] == {"mnist": 12, "eurosat": 10}[t]
            if rec["model"] == "quantized":
                assert row["bits"] == "4" and float(row["peak_rss_mb"]) > 0
    merged = json.loads((paper_run / "results" / SUITE / "merged" / "task_arithmetic.json").read_text())
    assert merged["params"] == {"lam": 0.3}
    md = (paper_run / "reports" / "leaderboard.md").read_text()
    assert f"## {SUITE}" in md
    for name in ("Base", "Experts", "FP merged", "RTN", "GPTQ", "E-PMQ"):
        assert name in md


def test_second_run_has_nothing_to_do(paper_run, world):
    r = _snakemake(paper_run, world, "--cores", "2", "--configfile", "paper.yaml", "-n")
    assert "Nothing to be done" in r.stdout + r.stderr


def test_missing_local_expert_fails_in_fetch_naming_it(world, tmp_path):
    gone = world / "exp_nowhere"
    cfg = _config(world, {"mnist": str(world / "exp_mnist"), "eurosat": str(gone)})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = _snakemake(tmp_path, world, "--cores", "2", "--configfile", "bad.yaml", check=False)
    assert r.returncode != 0
    assert "Error in rule fetch" in r.stdout + r.stderr, r.stderr[-3000:]
    log = (tmp_path / "logs" / "fetch" / f"{SUITE}.log").read_text()
    last = log.strip().splitlines()[-1]  # the exception line of the traceback: the whole message on one line
    assert last.startswith("epmq.errors.EPMQError: ") and f"model {gone} (no such local path)" in last, log[-2000:]
    assert str(world / "exp_mnist") not in last  # only what is missing is listed
    assert not (tmp_path / "results" / SUITE / "base.safetensors").exists()


# ------------------------------------------------------------------------------------- hub revisions (pins)

PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_carry_a_revision_for_every_hub_model_and_dataset(path):
    from epmq.models.sources import check_revision
    from epmq.suites import get_suite

    cfg = yaml.safe_load(path.read_text())
    epmq.config.validate(cfg)
    grid = epmq.config.expand(cfg)
    for s in grid.suites.values():
        suite = get_suite(s["type"], "unused", **s["options"])  # refuses missing or stray pins
        revs = s["options"]["revisions"]
        assert suite.hub_models() and suite.hub_datasets()
        assert list(revs["models"]) == suite.hub_models() and list(revs["datasets"]) == suite.hub_datasets()
        for rev in [*revs["models"].values(), *revs["datasets"].values()]:
            check_revision(rev, path.name)
    assert f"epmq pin --config configs/paper/{path.name} --write" in path.read_text()  # how to pin, said in place


def test_cifar_comes_from_fusion_benchs_copies():
    cfg = yaml.safe_load((ROOT / "configs" / "paper" / "vit-l14-20tasks.yaml").read_text())
    datasets_ = cfg["suites"]["vit-l14"]["options"]["revisions"]["datasets"]
    assert {"tanganke/cifar10", "tanganke/cifar100"} <= set(datasets_)
    assert not any(d.startswith("uoft-cs/") for d in datasets_)


def test_pin_resolves_branches_to_commits_and_writes_them_in_place(tmp_path, monkeypatch, capsys):
    """`epmq pin` asks the hub (mocked here) which commit each branch is at; --write changes exactly the revision
    values of the config file, comments and layout kept; --check passes only once every source is a commit."""
    import hashlib
    import types

    import huggingface_hub

    from epmq import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []

    def sha(kind, repo_id):
        return hashlib.sha1(f"{kind}:{repo_id}".encode()).hexdigest()

    def info(kind):
        def f(self, repo_id, revision=None, **kw):
            asked.append((kind, repo_id, revision))
            return types.SimpleNamespace(sha=sha(kind, repo_id))

        return f

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", info("model"))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", info("dataset"))
    for name in ("vit-l14-20tasks.yaml", "flan-t5-base-glue.yaml"):
        src = (ROOT / "configs" / "paper" / name).read_text()
        path = tmp_path / name
        path.write_text(src)
        assert cli.main(["pin", "--config", str(path), "--check"]) == 2
        assert "not pinned to a commit" in capsys.readouterr().err
        asked.clear()
        assert cli.main(["pin", "--config", str(path), "--write"]) == 0
        new = path.read_text()
        (sid, suite), = yaml.safe_load(new)["suites"].items()
        old = yaml.safe_load(src)["suites"][sid]["options"]["revisions"]
        want = {kind: {i: sha(kind[:-1], i) for i in ids} for kind, ids in old.items()}
        assert suite["options"]["revisions"] == want
        n = sum(len(ids) for ids in old.values())
        assert len(asked) == n and {rev for *_, rev in asked} == {"main"}
        changed = [(a, b) for a, b in zip(src.splitlines(), new.splitlines()) if a != b]
        assert len(src.splitlines()) == len(new.splitlines()) and len(changed) == n
        assert all(a.endswith(": main") and a.rsplit(":", 1)[0] == b.rsplit(":", 1)[0] for a, b in changed)
        assert cli.main(["pin", "--config", str(path), "--check"]) == 0
        asked.clear()
        assert cli.main(["pin", "--config", str(path)]) == 0 and asked == []  # commits stay: nothing to ask
        assert "revisions:" in capsys.readouterr().out


def test_dag_on_mocked_gpus_claims_once_per_job_and_matches_the_cpu_run(paper_run, world, tmp_path):
    """`device: cuda`, the suite on `device: auto`, 2 mocked GPUs (tests/fakecuda: the real claiming code,
    computing on the CPU). The quantize job asks for a device twice (the quantizer, then the suite's
    evaluation), which once made it wait an hour on its own lock; base (heads) and evaluate ask the suite.
    Every job claims at most once, only GPU rules claim, and the leaderboard equals the CPU run's."""
    from collections import defaultdict

    fake = Path(__file__).resolve().parent / "fakecuda"
    cfg = _config(world, {t: str(world / f"exp_{t}") for t in TASKS})
    cfg["device"] = "cuda"
    cfg["suites"][SUITE]["options"]["device"] = "auto"
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = tmp_path / "claims.jsonl"
    env = dict(_env(world), EPMQ_FAKE_CUDA="2", EPMQ_FAKE_CUDA_LOG=str(log), EPMQ_LOCK_DIR=str(tmp_path / "locks"),
               EPMQ_GPU_WAIT_S="120", PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "4", "--resources", "gpu=2", "--configfile", "paper.yaml"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    by_pid = defaultdict(list)
    for line in log.read_text().splitlines():
        e = json.loads(line)
        by_pid[e["pid"]].append(e)
    claimed = defaultdict(int)
    for evs in by_pid.values():
        kinds = [e["event"] for e in evs]
        assert kinds.count("claim") <= 1 and kinds.count("device") <= 1, f"a job claimed twice: {evs}"
        if "device" in kinds:
            claimed[next(e for e in evs if e["event"] == "device")["job"].split("/")[1]] += 1
            assert kinds[-1] == "exit", evs
    assert dict(claimed) == {"base": 1, "quantize": 3, "evaluate": 4}, dict(claimed)  # + merge: lam fixed, no scoring

    def board(work):
        keep = ("model", "expert_task", "method", "seed", "task", "value", "n")
        return sorted(tuple(row[k] for k in keep) for row in csv.DictReader((work / "reports" / "leaderboard.csv").open()))

    assert board(tmp_path) == board(paper_run)
