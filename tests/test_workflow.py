"""The Snakemake workflow: formatting, lint, dry runs of every shipped config, the config schema against the
registries, and one whole-DAG run on the tiny config whose leaderboard is checked against the run records."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import epmq.config
from epmq.errors import EPMQError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIGS = [ROOT / "config.yaml", *sorted((ROOT / "configs").rglob("*.yaml"))]


def _snakemake(*args, cwd=ROOT, check=True):
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(cwd), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=1500)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _load(path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    epmq.config.validate(cfg)
    return cfg


# ------------------------------------------------------------------ static checks


def test_snakefmt_clean():
    r = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_snakemake_lint_clean():
    r = _snakemake("--lint")
    assert "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_dry_run_of_every_shipped_config(config, tmp_path):
    r = _snakemake("-n", "--cores", "2", "--configfile", str(config), cwd=tmp_path)
    out = r.stdout + r.stderr
    grid = epmq.config.expand(_load(config))
    # every quantized run of the grid is a quantize job, every model an evaluate job
    assert f"quantize{' ' * 8}{len(grid.runs)}" in out or f"quantize {len(grid.runs)}" in " ".join(out.split())
    # base / experts / merged models are evaluate jobs; quantized models are evaluated by their quantize job
    n_eval = sum(len(grid.eval_targets(s)) for s in grid.suites) - len(grid.runs)
    assert f"evaluate {n_eval}" in " ".join(out.split())
    # what a quantize job reads is declared: the merged model and its merge record, the base (the heads)
    for block in out.split("rule quantize:")[1:]:
        inputs = block.split("input: ", 1)[1].split("\n", 1)[0].split(", ")
        assert {p.rsplit("/", 2)[-2] + "/" + p.rsplit(".", 1)[-1] for p in inputs} >= {
            "merged/safetensors", "merged/json"}, inputs
        assert any(p.endswith("/base.safetensors") for p in inputs), inputs


def test_schema_enums_match_registries():
    from epmq.merge import METHODS as MERGES
    from epmq.quant import METHODS as QUANTS
    from epmq.suites import DEFAULT_TASKS, SUITES

    schema = yaml.safe_load(epmq.config.schema_path().read_text())
    props = schema["properties"]
    assert set(props["suites"]["additionalProperties"]["properties"]["type"]["enum"]) == set(SUITES)
    assert set(props["merges"]["additionalProperties"]["properties"]["method"]["enum"]) == set(MERGES)
    assert set(props["quantize"]["properties"]["methods"]["items"]["enum"]) == set(QUANTS)
    knobs = set(props["quantize"]["properties"]["params"]["properties"])
    assert knobs == set(epmq.config.QUANT_KNOBS)
    assert set(DEFAULT_TASKS) == set(SUITES)
    from epmq.engine import DTYPE_KNOBS

    for knob, table in DTYPE_KNOBS.items():  # forward_dtype / act_dtype / stats_dtype
        assert set(props["quantize"]["properties"]["params"]["properties"][knob]["enum"]) == set(table), knob


def test_default_task_lists_match_the_suites():
    from epmq.suites import DEFAULT_TASKS, minilm, tiny_vit

    assert tuple(tiny_vit.DEFAULTS["tasks"]) == DEFAULT_TASKS["tiny-vit"]
    assert tuple(minilm.DEFAULTS["tasks"]) == DEFAULT_TASKS["minilm"]


# ------------------------------------------------------------------ config validation


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantize"].update(methods=["gptq", "awq"]), "quantize.methods.1"),
    (lambda c: c["quantize"].update(bits=[1]), "quantize.bits.0"),
    (lambda c: c.update(bogus=1), "bogus"),
    (lambda c: c["merges"]["task_arithmetic"].update(method="sum"), "merges.task_arithmetic.method"),
    (lambda c: c["quantize"]["params"].update(lam_w=-1), "quantize.params.lam_w"),
    (lambda c: c["calibration"].update(seeds=[]), "calibration.seeds"),
])
def test_schema_errors_name_the_culprit(edit, message):
    cfg = _tiny()
    edit(cfg)
    with pytest.raises(EPMQError, match=message.replace(".", r"\.")):
        epmq.config.validate(cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["merges"]["task_arithmetic"].update(params={"k": 20}), "not a parameter of task_arithmetic"),
    (lambda c: c["quantize"]["ablations"].update(merges=["ties"]), "merge 'ties' is not a key"),
    (lambda c: c["suites"]["tiny-vit"].update(type="vit-b-32"), "suites.tiny-vit"),
])
def test_semantic_errors_name_the_culprit(edit, message):
    cfg = _tiny()
    edit(cfg)
    with pytest.raises(EPMQError, match=message):
        epmq.config.expand(_validated(cfg))


def _validated(cfg):
    try:
        epmq.config.validate(cfg)
    except EPMQError:
        pass  # the schema may also object; expand must still give its own message
    return cfg


def _run(quantizer, suite="tiny-vit", merge="task_arithmetic", bits=3, group=-1, seed=0):
    """A quantized run named as a quantize job's wildcards name it."""
    from epmq.identity import QuantRun

    return QuantRun.from_wildcards({"suite": suite, "merge": merge, "quantizer": quantizer, "bits": str(bits),
                                    "group": str(group), "seed": str(seed)})


def test_grid_expansion_and_knob_scoping():
    grid = epmq.config.expand(_load(ROOT / "configs" / "tiny.yaml"))
    ids = [f"{r.quantizer}/s{r.seed}" for r in grid.runs]
    assert ids.count("rtn/s0") == 1 and "rtn/s1" not in ids  # RTN uses no calibration: one run
    assert {"gptq/s0", "gptq/s1", "epmq/s0", "epmq/s1", "epmq.lam_w=1/s0"} <= set(ids)
    qcfg = grid.quant_config(_run("epmq.lam_w=1"))
    # the path reads lam_w=1 back as the integer 1; the job gets the config's float, as the record has it
    assert qcfg["lam_w"] == 1.0 and isinstance(qcfg["lam_w"], float)
    # RTN / GPTQ do not see E-PMQ's knobs, so changing one re-runs only the E-PMQ branch
    assert "lam_w" not in grid.quant_config(_run("gptq")) and "damp" not in grid.quant_config(_run("rtn"))
    assert grid.quant_config(_run("epmq"))["lam_w"] == 0.01
    with pytest.raises(EPMQError, match=r"quantizer 'epmq.lam_w=7' \(quant/task_arithmetic/epmq.lam_w=7/w3g-1/s0"):
        grid.quant_config(_run("epmq.lam_w=7"))  # a sweep point off the grid: its values' types are unknown


def test_suite_level_quantizer_knobs_override_shared_ones():
    cfg = _tiny()
    cfg["suites"]["tiny-vit"]["quantize"] = {"forward_dtype": "bf16", "lam_w": 0.5}
    cfg["suites"]["other"] = {"type": "tiny-vit"}
    epmq.config.validate(cfg)
    grid = epmq.config.expand(cfg)
    assert grid.quant_config(_run("gptq"))["forward_dtype"] == "bf16"
    assert "forward_dtype" not in grid.quant_config(_run("rtn"))  # RTN reads no calibration knob
    assert grid.quant_config(_run("epmq"))["lam_w"] == 0.5
    assert grid.quant_config(_run("epmq.lam_w=1"))["lam_w"] == 1.0  # a sweep point wins
    assert grid.quant_config(_run("epmq", suite="other"))["lam_w"] == 0.01  # another suite: the shared knobs
    cfg["suites"]["tiny-vit"]["quantize"] = {"nope": 1}
    with pytest.raises(EPMQError, match=r"suites\.tiny-vit\.quantize"):
        epmq.config.validate(cfg)


def test_ablations_and_sweeps_can_be_limited_to_suites():
    cfg = _tiny()
    cfg["suites"]["other"] = {"type": "tiny-vit", "options": {"tasks": ["digits", "mnist"]}}
    cfg["quantize"]["ablations"]["suites"] = ["other"]
    cfg["quantize"]["sweeps"][0]["suites"] = ["tiny-vit"]
    grid = epmq.config.expand(_validated(cfg))
    by_suite = {s: {r.quantizer for r in grid.runs if r.suite == s} for s in grid.suites}
    assert "epmq_unrounded" in by_suite["other"] and "epmq_unrounded" not in by_suite["tiny-vit"]
    assert "epmq.lam_w=1" in by_suite["tiny-vit"] and "epmq.lam_w=1" not in by_suite["other"]
    assert grid.tasks("other") == ["digits", "mnist"]
    cfg["quantize"]["sweeps"][0]["suites"] = ["nope"]
    with pytest.raises(EPMQError, match="suite 'nope' is not a key"):
        epmq.config.expand(cfg)


def test_ablations_and_sweeps_can_run_on_fewer_seeds():
    cfg = _tiny()  # calibration seeds [0, 1]
    cfg["quantize"]["sweeps"][0]["seeds"] = [1]
    cfg["quantize"]["ablations"]["seeds"] = [0]
    grid = epmq.config.expand(_validated(cfg))
    seeds = {}
    for r in grid.runs:
        seeds.setdefault(r.quantizer, set()).add(r.seed)
    assert seeds["epmq.lam_w=1"] == {1} and seeds["epmq_unrounded"] == {0} and seeds["epmq"] == {0, 1}
    cfg["quantize"]["sweeps"][0]["seeds"] = [7]
    with pytest.raises(EPMQError, match=r"quantize\.sweeps\[0\]\.seeds: 7 is not one of calibration\.seeds"):
        epmq.config.expand(cfg)


def test_claim_gpu_gives_distinct_devices(tmp_path):
    from epmq.device import claim_gpu

    assert claim_gpu(2, lock_dir=tmp_path) == 0
    assert claim_gpu(2, lock_dir=tmp_path) == 1
    with pytest.raises(EPMQError, match="no free GPU"):
        claim_gpu(2, lock_dir=tmp_path, wait_s=0)


def test_cli_help_for_every_command():
    for cmd in ["build", "merge", "calibrate", "quantize", "evaluate", "report", "grid", "run"]:
        r = subprocess.run([str(BIN / "epmq"), cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: epmq" in r.stdout, (cmd, r.stderr)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([str(BIN / "epmq"), "grid", "--config", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such config file" in r.stderr


# ------------------------------------------------------------------ the whole DAG


# tiny_run (tests/conftest.py): configs/tiny.yaml run end to end in a fresh folder, once per test run


def test_dag_leaderboard_matches_run_records(tiny_run):
    cfg = _load(tiny_run / "tiny.yaml")
    grid = epmq.config.expand(cfg)
    res, rep = tiny_run / cfg["results"], tiny_run / cfg["reports"]
    records = {m: json.loads((res / "tiny-vit" / "eval" / f"{m}.json").read_text())
               for m in grid.eval_targets("tiny-vit")}
    rows = list(csv.DictReader((rep / "leaderboard.csv").open()))
    tasks = grid.tasks("tiny-vit")
    # every model on every task, except that an expert is evaluated on its own task only
    assert len(rows) == sum(1 if r["model"] == "expert" else len(tasks) for r in records.values())
    assert all(list(r["tasks"]) == [r["expert_task"]] for r in records.values() if r["model"] == "expert")
    for r in rows:
        assert r["suite"] == "tiny-vit" and r["metric"] == "accuracy" and r["task"] in tasks
    quant = [r for r in rows if r["model"] == "quantized"]
    assert {r["method"] for r in quant} == {"rtn", "gptq", "epmq", "epmq_unrounded"}
    # every quantized cell is the record's number
    for m, rec in records.items():
        if rec["model"] != "quantized":
            continue
        for t in tasks:
            (row,) = [r for r in quant if r["method"] == rec["method"] and r["seed"] == ("" if rec["seed"] is None else str(rec["seed"]))
                      and r["variant"] == "".join(f"{k}={v:g}" for k, v in rec["variant"].items())
                      and r["task"] == t] or [None]
            assert row is not None, (m, t)
            assert float(row["value"]) == pytest.approx(rec["tasks"][t]["accuracy"], abs=0.01)
    # cost joined from the quantize benchmark files; merged lam chosen on validation
    assert all(float(r["peak_rss_mb"]) > 0 for r in quant)
    # the packed checkpoint's size: measured by every job that leaves integer codes, the same for every method
    # of one bit width (3 here), far below the float32 merged file; the unrounded target ships nothing
    packed = {r["method"]: float(r["packed_mb"]) for r in quant if r["packed_mb"]}
    assert set(packed) == {"rtn", "gptq", "epmq"} and not any(r["packed_mb"] for r in quant
                                                              if r["method"] == "epmq_unrounded")
    fp_mb = (res / "tiny-vit" / "merged" / "task_arithmetic.safetensors").stat().st_size / 2**20
    assert max(packed.values()) / min(packed.values()) < 1.01 and max(packed.values()) < fp_mb
    merged = json.loads((res / "tiny-vit" / "merged" / "task_arithmetic.json").read_text())
    assert merged["selected_on"] == "validation" and len(merged["trials"]) == 2
    best = max(merged["trials"], key=lambda t: t["validation_mean"])
    assert merged["params"]["lam"] == best["params"]["lam"]
    # the markdown shows every method and the GPTQ mean the records give
    md = (rep / "leaderboard.md").read_text()
    for name in ("Base", "Experts", "FP merged", "RTN", "GPTQ", "E-PMQ"):
        assert name in md
    gptq = [records[f"quant/task_arithmetic/gptq/w3g-1/s{s}"] for s in (0, 1)]
    avg = sum(sum(r["tasks"][t]["accuracy"] for t in tasks) / len(tasks) for r in gptq) / 2
    assert f"{avg:.1f}" in md
    assert (rep / "leaderboard.html").read_text().count("<table") >= 1
    figures = sorted(p.name for p in (rep / "figures").iterdir() if not p.name.startswith("."))
    assert figures == ["accuracy_vs_bits_tiny-vit.svg", "anchor_sweep_tiny-vit.svg", "heatmap_tiny-vit.svg"]
    # quantized models are evaluated inside their quantize job: no weights file is written; the records stay
    assert not list((res / "tiny-vit" / "quant").rglob("*.safetensors"))
    assert len(list((res / "tiny-vit" / "quant").rglob("*.json"))) == len(grid.runs)


def test_dag_second_run_has_nothing_to_do(tiny_run):
    r = _snakemake("--cores", "2", "--configfile", "tiny.yaml", "-n", cwd=tiny_run)
    assert "Nothing to be done" in r.stdout + r.stderr


def test_dag_changing_one_knob_reruns_only_its_branch(tiny_run):
    cfg = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    cfg["quantize"]["params"]["lam_w"] = 0.05
    (tiny_run / "knob.yaml").write_text(yaml.safe_dump(cfg))
    r = _snakemake("--cores", "2", "--configfile", "knob.yaml", "-n", "--quiet", "rules", cwd=tiny_run)
    out = " ".join((r.stdout + r.stderr).split())
    # the 2 default-variant E-PMQ and 2 unrounded-target runs (they read lam_w); not RTN, GPTQ, the sweep point
    # (its own lam_w) or anything upstream
    assert "quantize 4" in out and "evaluate" not in out and "report 1" in out, out
    for rule in ("base", "expert", "merge", "calibrate"):
        assert f" {rule} " not in out.replace("Job stats", ""), out


def test_dag_resumes_after_a_failure_without_recomputing(tiny_run):
    res = tiny_run / "results-tiny" / "tiny-vit"
    keep = {p: p.stat().st_mtime_ns for p in [res / "base.safetensors", *res.glob("experts/*.safetensors"),
                                              res / "merged" / "task_arithmetic.safetensors"]}
    # a run killed during one evaluation: that job's output and everything after it (the report) are absent
    victim = res / "eval" / "quant" / "task_arithmetic" / "gptq" / "w3g-1" / "s0.json"
    victim.unlink()
    shutil.rmtree(tiny_run / "reports-tiny")
    r = _snakemake("--cores", "2", "--configfile", "tiny.yaml", "-n", "--quiet", "rules", cwd=tiny_run)
    out = " ".join((r.stdout + r.stderr).split())
    # its quantize job (which evaluates) runs again, nothing else upstream
    assert "quantize 1" in out and "evaluate" not in out and "report 1" in out and "merge" not in out, out
    _snakemake("--cores", "2", "--configfile", "tiny.yaml", cwd=tiny_run)
    assert victim.is_file()
    assert {p: p.stat().st_mtime_ns for p in keep} == keep


def test_every_job_log_ends_with_its_peak_memory(tmp_path):
    """``log_to`` (every workflow script runs inside it) ends the job's log with the peak host RSS (and the peak
    GPU memory where CUDA was used); a failed job's log has that line before the traceback, whose exception
    line stays the last."""
    import re

    from epmq.pipeline import log_to

    ok, bad = tmp_path / "ok.log", tmp_path / "bad.log"
    with log_to(ok):
        print("working")
    with pytest.raises(RuntimeError):
        with log_to(bad):
            raise RuntimeError("boom")
    memory = r"peak host RSS \d+ MB(; peak GPU memory \d+ MB on cuda:\d+)*"
    lines = ok.read_text().strip().splitlines()
    assert lines[0] == "working" and re.fullmatch(memory, lines[-1]), lines
    lines = bad.read_text().strip().splitlines()
    assert re.fullmatch(memory, lines[0]) and lines[1].startswith("Traceback") and lines[-1] == "RuntimeError: boom"
