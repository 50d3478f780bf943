"""The leaderboard (epmq.report): synthetic run JSONs in, hand-computed numbers out, byte-identical rebuilds."""

from __future__ import annotations

import csv
import json
import math
import random
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from epmq.errors import EPMQError
from epmq.report import build_leaderboard, load_runs, read_benchmark

SUITE = "tiny-vit"
TASKS = ("mnist", "svhn")
N_TEST = {"mnist": 2000, "svhn": 1000}
SEEDS = (0, 1, 2)
MERGES = {"task_arithmetic": {"lam": 0.3}, "ties": {"k": 20, "lam": 0.3}}
FP = {"task_arithmetic": {"mnist": 85.0, "svhn": 70.0}, "ties": {"mnist": 88.0, "svhn": 74.0}}
# accuracy drop from the FP merged model per (merge, method, bits); E-PMQ *loses* to GPTQ on TIES at 4 bits
DROP = {
    ("task_arithmetic", "rtn", 2): 40.0,
    ("task_arithmetic", "gptq", 2): 15.0,
    ("task_arithmetic", "epmq", 2): 4.0,
    ("task_arithmetic", "rtn", 4): 3.0,
    ("task_arithmetic", "gptq", 4): 1.5,
    ("task_arithmetic", "epmq", 4): -0.5,
    ("ties", "rtn", 2): 45.0,
    ("ties", "gptq", 2): 12.0,
    ("ties", "epmq", 2): 5.0,
    ("ties", "rtn", 4): 4.0,
    ("ties", "gptq", 4): 1.0,
    ("ties", "epmq", 4): 2.2,
    ("task_arithmetic", "gptq_epmq_hessian", 4): 1.2,
}
SEED_JITTER = {None: 0.0, 0: -0.6, 1: 0.1, 2: 0.9}
TASK_JITTER = {"mnist": 0.35, "svhn": -0.4}
PROV = {"epmq": "0.1.0", "torch": "2.13.0", "git_sha": "abc1234"}


def rec(task: str, acc: float) -> dict:
    n = N_TEST[task]
    correct = round(acc * n / 100)
    p = correct / n
    return {
        "task": task,
        "split": "test",
        "n": n,
        "correct": correct,
        "accuracy": 100 * p,
        "stderr": 100 * math.sqrt(p * (1 - p) / n),
    }


def make_run(
    model,
    accs,
    *,
    suite=SUITE,
    expert_task=None,
    merge=None,
    method=None,
    bits=None,
    seed=None,
    variant=None,
    quant_params=None,
    seconds=None,
    group_size=None,
    packed_mb=None,
):
    return {
        "schema": 1,
        "suite": suite,
        "model": model,
        "expert_task": expert_task,
        "merge": merge,
        "merge_params": dict(MERGES.get(merge, {})),
        "method": method,
        "bits": bits,
        "group_size": group_size if group_size is not None else (-1 if model == "quantized" else None),
        "variant": variant or {},
        "quant_params": quant_params or {},
        "seed": seed,
        "n_calib": 128 if seed is not None else None,
        "split": "test",
        "tasks": {t: rec(t, a) for t, a in accs.items()},
        "cost": {"quantize_seconds": seconds, "peak_rss_mb": None, "gpu_mb": None, "packed_mb": packed_mb},
        "provenance": dict(PROV),
    }


def quant_accs(merge, method, bits, seed, extra=0.0):
    d = DROP[(merge, method, bits)]
    return {t: FP[merge][t] - d + SEED_JITTER[seed] + TASK_JITTER[t] * (1 + (seed or 0)) + extra for t in TASKS}


def synthetic_runs() -> list[dict]:
    runs = [make_run("base", {"mnist": 40.0, "svhn": 30.0})]
    runs += [
        make_run("expert", {"mnist": 99.0, "svhn": 20.0}, expert_task="mnist"),
        make_run("expert", {"mnist": 35.0, "svhn": 91.0}, expert_task="svhn"),
    ]
    runs += [make_run("merged", FP[m], merge=m) for m in MERGES]
    for merge in MERGES:
        for bits in (2, 4):
            runs.append(
                make_run("quantized", quant_accs(merge, "rtn", bits, None), merge=merge, method="rtn", bits=bits)
            )
            for method in ("gptq", "epmq"):
                for s in SEEDS:
                    qp = {"lam_w": 0.01, "alpha": 1.0, "seed": s} if method == "epmq" else {"damp": 0.01}
                    runs.append(
                        make_run(
                            "quantized",
                            quant_accs(merge, method, bits, s),
                            merge=merge,
                            method=method,
                            bits=bits,
                            seed=s,
                            quant_params=qp,
                            seconds=10.0 + s + (4 if method == "epmq" else 0),
                            packed_mb=0.125 * bits + 0.0625,  # what the bit width makes it, for every method
                        )
                    )
    for s in SEEDS:  # one ablation row
        runs.append(
            make_run(
                "quantized",
                quant_accs("task_arithmetic", "gptq_epmq_hessian", 4, s),
                merge="task_arithmetic",
                method="gptq_epmq_hessian",
                bits=4,
                seed=s,
                seconds=11.0,
            )
        )
    for lam_w, extra in ((0.1, -1.0), (1.0, -3.0)):  # an anchor sweep of E-PMQ at 2 bits
        for s in SEEDS:
            runs.append(
                make_run(
                    "quantized",
                    quant_accs("task_arithmetic", "epmq", 2, s, extra),
                    merge="task_arithmetic",
                    method="epmq",
                    bits=2,
                    seed=s,
                    variant={"lam_w": lam_w},
                    quant_params={"lam_w": lam_w, "alpha": 1.0, "seed": s},
                    seconds=14.0,
                )
            )
    # a second suite (name needs sanitising) with a task missing from its quantized run
    N_TEST.setdefault("sst2", 872)
    runs.append(make_run("base", {"mnist": 50.0, "sst2": 60.0}, suite="minilm/v2"))
    runs.append(make_run("merged", {"mnist": 70.0, "sst2": 80.0}, suite="minilm/v2", merge="task_arithmetic"))
    runs.append(
        make_run("quantized", {"mnist": 65.0}, suite="minilm/v2", merge="task_arithmetic", method="rtn", bits=3)
    )
    return runs


def write_runs(folder: Path, runs: list[dict]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(runs):
        p = folder / f"run{i:03d}.json"
        p.write_text(json.dumps(r, indent=1))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = synthetic_runs()
    paths = write_runs(root / "evals", runs)
    loaded = load_runs(paths)
    meta = {
        "calibration": "128 examples per task from each task's train split",
        "seeds": list(SEEDS),
        "versions": {"epmq": "0.1.0", "torch": "2.13.0"},
        "git_sha": "abc1234",
        "config": "config.yaml",
        "command": "snakemake --cores all",
    }
    out = build_leaderboard(loaded, root / "out", meta=meta)
    return {
        "root": root,
        "runs": runs,
        "paths": paths,
        "loaded": loaded,
        "out": out,
        "meta": meta,
        "md": out["md"].read_text(encoding="utf-8"),
    }


# ------------------------------------------------------------------------------------------- helpers


def md_section(md: str, suite: str, table: str) -> list[list[str]]:
    """The rows (cells stripped) of one table (### heading) of one suite (## heading) of leaderboard.md."""
    part = md.split(f"\n## {suite}\n", 1)[1].split("\n## ", 1)[0]
    part = part.split(f"\n### {table}\n", 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def find_row(rows, method, merge, bits):
    header = rows[0]
    hits = [dict(zip(header, r)) for r in rows[2:] if r[0] == method and r[1].startswith(merge) and r[2] == bits]
    assert len(hits) == 1, (method, merge, bits, hits)
    return hits[0]


def group(runs, merge, method, bits, variant=None):
    return [
        r
        for r in runs
        if r["suite"] == SUITE
        and r["model"] == "quantized"
        and r["merge"] == merge
        and r["method"] == method
        and r["bits"] == bits
        and r["variant"] == (variant or {})
    ]


def per_seed_avg(runs):
    return [statistics.mean(r["tasks"][t]["accuracy"] for t in TASKS) for r in runs]


# ------------------------------------------------------------------------------------------- load_runs


def test_load_runs_round_trip(data):
    assert len(data["loaded"]) == len(data["runs"])
    for orig, got, path in zip(data["runs"], data["loaded"], data["paths"]):
        assert got["source"] == str(path)
        assert {k: v for k, v in got.items() if k != "source"} == orig


def test_load_runs_errors_name_the_file(tmp_path):
    good = make_run("base", {"mnist": 40.0})
    cases = {  # file name -> (content or None for a missing file, expected message after "<path>: ")
        "nope.json": (None, "no such evaluation file"),
        "bad.json": ('{"schema": 1, "suite": ', "not valid JSON"),
        "no_tasks.json": (json.dumps({k: v for k, v in good.items() if k != "tasks"}), "missing key 'tasks'"),
        "bad_acc.json": (
            json.dumps({**good, "tasks": {"mnist": {"accuracy": 140.0}}}),
            r"tasks\['mnist'\]\.accuracy=140",
        ),
        "q.json": (
            json.dumps({**good, "model": "quantized", "merge": "ties", "bits": 4}),
            "model='quantized' needs method",
        ),
        "s2.json": (json.dumps({**good, "schema": 2}), "schema=2"),
        "list.json": ("[1, 2]", "expected a JSON object"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(EPMQError, match=re.escape(str(path)) + ": " + message) as err:
            load_runs([path])
        assert "\n" not in str(err.value)  # one line
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(good))
    with pytest.raises(EPMQError, match="parallel"):
        load_runs([ok], [None, None])
    with pytest.raises(EPMQError, match="no runs"):
        build_leaderboard([], tmp_path / "out")
    twin = tmp_path / "twin.json"
    twin.write_text(json.dumps(good))
    with pytest.raises(EPMQError, match=r"twin\.json: describes the same run as .*ok\.json"):
        build_leaderboard(load_runs([ok, twin]), tmp_path / "out")


def test_benchmark_tsv_fills_cost(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    b1 = tmp_path / "q1.tsv"
    b1.write_text(header + "12.5\t0:00:12\t812.25\t900\t-\t-\tNA\t0.1\t95.0\t11.9\n")
    b2 = tmp_path / "q2.tsv"
    b2.write_text(header + "7.0\t0:00:07\tNA\t-\t-\t-\t-\t-\t-\t-\n")
    r1 = make_run("quantized", {"mnist": 80.0}, merge="ties", method="gptq", bits=4, seed=0)  # no seconds in JSON
    r2 = make_run("quantized", {"mnist": 81.0}, merge="ties", method="gptq", bits=4, seed=1, seconds=3.0)
    r3 = make_run("quantized", {"mnist": 82.0}, merge="ties", method="gptq", bits=4, seed=2, seconds=4.0)
    p1, p2, p3 = write_runs(tmp_path / "e", [r1, r2, r3])
    runs = load_runs([p1, p2, p3], [b1, b2, None])
    assert runs[0]["cost"]["peak_rss_mb"] == 812.25 and runs[0]["cost"]["quantize_seconds"] == 12.5
    assert runs[1]["cost"]["peak_rss_mb"] is None and runs[1]["cost"]["quantize_seconds"] == 3.0  # JSON's value kept
    assert runs[2]["cost"]["peak_rss_mb"] is None and runs[2]["cost"]["quantize_seconds"] == 4.0
    assert read_benchmark(b2) == {"seconds": 7.0, "max_rss_mb": None}
    out = build_leaderboard(runs, tmp_path / "out", figures=False)
    rows = list(csv.DictReader(out["csv"].open()))
    assert [r["peak_rss_mb"] for r in rows] == ["812.2", "", ""]  # fixed precision (banker's rounding of .25)
    assert [r["quantize_seconds"] for r in rows] == ["12.500", "3.000", "4.000"]
    with pytest.raises(EPMQError, match=r"nope\.tsv: no such benchmark file"):
        load_runs([p1], [tmp_path / "nope.tsv"])
    broken = tmp_path / "broken.tsv"
    broken.write_text(header + "abc\t0\t1\t1\t1\t1\t1\t1\t1\t1\n")
    with pytest.raises(EPMQError, match=r"broken\.tsv: column 's'"):
        load_runs([p1], [broken])


# ------------------------------------------------------------------------------------------- CSV


def test_csv_rows_and_values(data):
    rows = list(csv.DictReader(data["out"]["csv"].open()))
    assert len(rows) == sum(len(r["tasks"]) for r in data["runs"])
    assert {
        "suite",
        "model",
        "merge_params",
        "variant",
        "seed",
        "task",
        "metric",
        "value",
        "stderr",
        "n",
        "quantize_seconds",
        "peak_rss_mb",
        "gpu_mb",
        "epmq_version",
        "torch_version",
        "git_sha",
    } <= set(rows[0])
    # stable order: suite, then base < expert < merged < quantized
    assert [r["suite"] for r in rows[:1]] == ["minilm/v2"] and rows[0]["model"] == "base"
    tv = [r for r in rows if r["suite"] == SUITE]
    order = {"base": 0, "expert": 1, "merged": 2, "quantized": 3}
    assert [order[r["model"]] for r in tv] == sorted(order[r["model"]] for r in tv)
    (run,) = [r for r in group(data["runs"], "ties", "epmq", 4) if r["seed"] == 1]
    (row,) = [
        r
        for r in tv
        if r["merge"] == "ties"
        and r["method"] == "epmq"
        and r["bits"] == "4"
        and r["seed"] == "1"
        and r["task"] == "svhn"
    ]
    assert row["value"] == f"{run['tasks']['svhn']['accuracy']:.4f}"
    assert row["stderr"] == f"{run['tasks']['svhn']['stderr']:.4f}"
    assert row["n"] == "1000" and row["metric"] == "accuracy" and row["merge_params"] == '{"k":20,"lam":0.3}'
    assert row["quantize_seconds"] == "15.000" and row["git_sha"] == "abc1234" and row["variant"] == ""
    sweep = [r for r in tv if r["variant"] == "lam_w=0.1"]
    assert len(sweep) == len(SEEDS) * len(TASKS)


# ------------------------------------------------------------------------------------------- Markdown


def test_md_avg_std_and_stderr_hand_computed(data):
    rows = md_section(data["md"], SUITE, "Leaderboard")
    runs = sorted(group(data["runs"], "task_arithmetic", "epmq", 2), key=lambda r: r["seed"])
    avgs = per_seed_avg(runs)
    se = statistics.mean(math.sqrt(sum(r["tasks"][t]["stderr"] ** 2 for t in TASKS)) / len(TASKS) for r in runs)
    row = find_row(rows, "E-PMQ", "Task Arithmetic", "2")
    assert row["Avg"].startswith(f"**{statistics.mean(avgs):.1f} ± {statistics.stdev(avgs):.1f}** ({se:.1f})")
    mnist = [r["tasks"]["mnist"]["accuracy"] for r in runs]
    mnist_se = statistics.mean(r["tasks"]["mnist"]["stderr"] for r in runs)
    assert row["mnist"] == f"{statistics.mean(mnist):.1f} ± {statistics.stdev(mnist):.1f} ({mnist_se:.1f})"
    # RTN: one deterministic run, so no ± part
    (rtn,) = group(data["runs"], "ties", "rtn", 4)
    row = find_row(rows, "RTN", "TIES", "4")
    assert row["Avg"].startswith(f"**{per_seed_avg([rtn])[0]:.1f}** (")
    # every Avg is bold, also in the reference rows
    assert all(r[len(TASKS) + 3].startswith("**") for r in rows[2:] if r[len(TASKS) + 3] != "–")


def test_md_delta_and_best_mark(data):
    rows = md_section(data["md"], SUITE, "Leaderboard")
    header = rows[0]
    dcol = header[-1]
    assert dcol == "Δ(E-PMQ − GPTQ)"

    def d(merge, bits):
        return statistics.mean(per_seed_avg(group(data["runs"], merge, "epmq", bits))) - statistics.mean(
            per_seed_avg(group(data["runs"], merge, "gptq", bits))
        )

    win, loss = d("task_arithmetic", 2), d("ties", 4)
    assert win > 5 and loss < 0
    assert find_row(rows, "E-PMQ", "Task Arithmetic", "2")[dcol] == f"+{win:.1f}"
    assert find_row(rows, "E-PMQ", "TIES", "4")[dcol] == f"−{-loss:.1f}"  # the loss is shown, with a real minus
    assert find_row(rows, "GPTQ", "TIES", "4")[dcol] == ""  # Δ only on the E-PMQ row
    # best per block: E-PMQ where it wins, GPTQ where E-PMQ loses, exactly one mark per block here
    assert find_row(rows, "E-PMQ", "Task Arithmetic", "2")["Avg"].endswith("†")
    assert not find_row(rows, "GPTQ", "Task Arithmetic", "2")["Avg"].endswith("†")
    assert find_row(rows, "GPTQ", "TIES", "4")["Avg"].endswith("†")
    assert not find_row(rows, "E-PMQ", "TIES", "4")["Avg"].endswith("†")
    assert sum(r[-2].endswith("†") for r in rows[2:]) == 4  # 2 merges × 2 bit widths
    # TA 4-bit block: the ablation row follows RTN, GPTQ, E-PMQ
    block = [r[0] for r in rows[2:] if r[1] == "Task Arithmetic" and r[2] == "4"]
    assert block == ["RTN", "GPTQ", "E-PMQ", "GPTQ, E-PMQ Hessian, merged target"]


def test_md_reference_rows(data):
    rows = md_section(data["md"], SUITE, "Leaderboard")
    assert [r[0] for r in rows[2:6]] == ["Base (zero-shot)", "Experts (each on its own task)", "FP merged", "FP merged"]
    experts = find_row(rows, "Experts (each on its own task)", "–", "FP")
    assert experts["mnist"].startswith("99.0 (") and experts["svhn"].startswith("91.0 (")  # the diagonal
    assert experts["Avg"].startswith("**95.0** (")
    assert find_row(rows, "FP merged", "Task Arithmetic", "FP")["Merge"] == "Task Arithmetic (λ=0.3)"
    assert find_row(rows, "FP merged", "TIES", "FP")["Merge"] == "TIES (λ=0.3, k=20)"
    assert find_row(rows, "Base (zero-shot)", "–", "FP")["Avg"].startswith("**35.0**")


def test_md_header_sweeps_cost_and_missing(data):
    md = data["md"]
    head = md.split("\n## ", 2)[1]
    for text in (
        "top-1 accuracy",
        "unweighted mean",
        "mean ± std (se)",
        "binomial standard error",
        "†",
        "128 examples per task from each task's train split",
        "Seeds**: 0, 1, 2",
        "epmq 0.1.0, torch 2.13.0",
        "`abc1234`",
        "`snakemake --cores all`",
    ):
        assert text in head, text
    sweep = md_section(md, SUITE, "Hyperparameter sweeps")
    assert [r[3] for r in sweep[2:]] == ["default", "default (lam_w=0.01)", "lam_w=0.1", "lam_w=1"]
    s01 = per_seed_avg(group(data["runs"], "task_arithmetic", "epmq", 2, {"lam_w": 0.1}))
    dflt = per_seed_avg(group(data["runs"], "task_arithmetic", "epmq", 2))
    row = dict(zip(sweep[0], sweep[4]))
    assert row["Avg"].startswith(f"{statistics.mean(s01):.1f} ± {statistics.stdev(s01):.1f}")
    assert row["Δ vs default"] == f"−{statistics.mean(dflt) - statistics.mean(s01):.1f}"
    cost = {r[0]: dict(zip(md_section(md, SUITE, "Cost")[0], r)) for r in md_section(md, SUITE, "Cost")[2:]}
    assert cost["GPTQ"]["Quantize time, median (s)"] == "11.0" and cost["E-PMQ"]["Quantize time, median (s)"] == "15.0"
    assert cost["E-PMQ"]["Time vs GPTQ"] == f"{15 / 11:.2f}×" and cost["RTN"]["Quantize time, median (s)"] == "–"
    bits = sorted({r["bits"] for r in data["runs"] if r["model"] == "quantized" and r["suite"] == SUITE})
    header = f"Packed MB ({' / '.join(map(str, bits))} bits)"
    assert cost["GPTQ"][header] == " / ".join(f"{0.125 * b + 0.0625:.2g}" for b in bits)
    assert cost["RTN"][header] == "–"  # its runs carry no size
    # second suite: a quantized run lacking a task gets "–" there and no Avg; absent methods are "–"
    other = md_section(md, "minilm/v2", "Leaderboard")
    rtn = find_row(other, "RTN", "Task Arithmetic", "3")
    assert rtn["sst2"] == "–" and rtn["Avg"] == "–" and rtn["mnist"].startswith("65.0")
    assert find_row(other, "GPTQ", "Task Arithmetic", "3")["Avg"] == "–"
    assert find_row(other, "Experts (each on its own task)", "–", "FP")["mnist"] == "–"
    assert "### Hyperparameter sweeps" not in md.split("\n## minilm/v2\n")[1].split("\n## ")[0]


# ------------------------------------------------------------------------------------------- files


def test_figures_are_valid_svg(data):
    out = data["out"]
    names = sorted(k for k in out if k.startswith("figures/"))
    assert names == [
        "figures/accuracy_vs_bits_minilm_v2.svg",
        "figures/accuracy_vs_bits_tiny-vit.svg",
        "figures/anchor_sweep_tiny-vit.svg",
        "figures/heatmap_minilm_v2.svg",
        "figures/heatmap_tiny-vit.svg",
    ]
    for k in names:
        root = ET.parse(out[k]).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        texts = "".join(root.itertext())
        assert "\n" in texts or len(list(root.iter())) > 50  # a real drawing, not an empty canvas
    assert "figures/accuracy_vs_bits_tiny-vit.svg" in data["md"]
    assert out["figures/anchor_sweep_tiny-vit.svg"].read_text().count('<g id="axes_') == 1  # one facet: lam_w


def test_html_self_contained(data):
    page = data["out"]["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 5 and "<table>" in page
    assert "<script" not in page and 'src="http' not in page and "<link" not in page
    assert '<a href="leaderboard.csv"' in page and "<strong>" in page and 'class="mark"' in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the inlined figures' ids do not collide
    refs = set(re.findall(r"url\(#([^)]+)\)", page)) | set(re.findall(r'href="#([^"]+)"', page))
    assert refs <= set(ids)
    assert "−" in page and "Δ(E-PMQ − GPTQ)" in page


def test_rebuild_is_byte_identical_and_order_free(data, tmp_path):
    runs = list(data["loaded"])
    random.Random(0).shuffle(runs)
    again = build_leaderboard(runs, tmp_path / "again", meta=data["meta"])
    assert set(again) == set(data["out"])
    for key, path in data["out"].items():
        assert again[key].read_bytes() == path.read_bytes(), key
    assert not list((tmp_path / "again").rglob(".*tmp*"))  # no temp files left behind


def test_import_is_cheap():
    code = (
        "import sys, epmq.report; bad = {'torch', 'matplotlib', 'pandas', 'numpy'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- quoted numbers

QUOTED = "Quoted from the literature (not reproduced here)"
FB = "FusionBench (Tang et al., 2024), CLIP ViT-B/32, 8 tasks"
ANCHORS = {
    SUITE: [  # deliberately not in table order
        # higher than every quantized row of its block: it must not take the † mark (nor change Δ)
        {
            "label": "E-PMQ paper",
            "source": "arXiv 2605.16882",
            "model": "quantized",
            "merge": "ties",
            "method": "gptq",
            "bits": 4,
            "value": 99.9,
        },
        {
            "label": "FusionBench",
            "source": FB,
            "model": "merged",
            "merge": "task_arithmetic",
            "value": 68.0,
            "tasks": {"svhn": 55.5, "mnist": 80.5},
        },
        {"label": "FusionBench", "source": FB, "model": "base", "value": 48.2},
    ]
}
OLD_CSV_COLUMNS = [
    "suite", "model", "expert_task", "merge", "merge_params", "method", "bits", "group_size", "variant", "seed",
    "n_calib", "split", "task", "metric", "value", "stderr", "n", "correct", "quantize_seconds", "peak_rss_mb",
    "gpu_mb", "quant_params", "epmq_version", "torch_version", "git_sha",
]  # fmt: skip


def test_sweep_point_on_fewer_seeds_says_so(tmp_path):
    """A sweep point run on fewer seeds than its default (``sweeps[].seeds``) is labelled with its seed count and
    shows no std."""
    runs = [r for r in synthetic_runs() if not (r.get("variant") == {"lam_w": 1.0} and r.get("seed") != 0)]
    out = build_leaderboard(load_runs(write_runs(tmp_path / "evals", runs)), tmp_path / "out", meta={})
    sweep = md_section(out["md"].read_text(encoding="utf-8"), SUITE, "Hyperparameter sweeps")
    rows = {r[3]: dict(zip(sweep[0], r)) for r in sweep[2:]}
    assert set(rows) == {"default", "default (lam_w=0.01)", "lam_w=0.1", "lam_w=1 (1 seed)"}
    assert "±" not in rows["lam_w=1 (1 seed)"]["Avg"] and "±" in rows["lam_w=0.1"]["Avg"]
    # its Δs are paired with the runs on seed 0, not the defaults' means over all seeds
    from epmq.report.tables import fmt_delta

    point = per_seed_avg(group(runs, "task_arithmetic", "epmq", 2, {"lam_w": 1.0}))
    dflt = per_seed_avg(group(runs, "task_arithmetic", "epmq", 2))
    gptq = per_seed_avg(group(runs, "task_arithmetic", "gptq", 2))
    assert len(point) == 1 and len(dflt) == len(gptq) == len(SEEDS) > 1
    assert rows["lam_w=1 (1 seed)"]["Δ vs default"] == fmt_delta(point[0] - dflt[0])
    assert rows["lam_w=1 (1 seed)"]["Δ vs GPTQ"] == fmt_delta(point[0] - gptq[0])


def test_main_table_delta_on_different_seed_sets_is_paired_and_labelled(tmp_path):
    """E-PMQ missing a seed in one block (a record not run yet, with ``--partial``): its Δ against GPTQ is the
    mean per-seed difference over the seeds both have, labelled with their count; other blocks are unchanged."""
    from epmq.report.tables import fmt_delta

    runs = [r for r in synthetic_runs() if not (r.get("method") == "epmq" and r.get("bits") == 2
                                                and r.get("merge") == "ties" and r.get("seed") == SEEDS[-1])]
    out = build_leaderboard(load_runs(write_runs(tmp_path / "evals", runs)), tmp_path / "out", meta={})
    table = md_section(out["md"].read_text(encoding="utf-8"), SUITE, "Leaderboard")
    epmq = per_seed_avg(group(runs, "ties", "epmq", 2))
    gptq = per_seed_avg(group(runs, "ties", "gptq", 2))
    assert len(epmq) == len(SEEDS) - 1 and len(gptq) == len(SEEDS)
    paired = sum(e - g for e, g in zip(epmq, gptq)) / len(epmq)  # seeds in order: the first ones are shared
    n = len(epmq)
    assert find_row(table, "E-PMQ (2 seeds)", "TIES", "2")["Δ(E-PMQ − GPTQ)"] == f"{fmt_delta(paired)} ({n} seeds)"
    full = per_seed_avg(group(runs, "ties", "epmq", 4)), per_seed_avg(group(runs, "ties", "gptq", 4))
    want = fmt_delta(sum(full[0]) / len(full[0]) - sum(full[1]) / len(full[1]))
    assert find_row(table, "E-PMQ", "TIES", "4")["Δ(E-PMQ − GPTQ)"] == want


@pytest.fixture(scope="module")
def quoted(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("quoted")
    out = build_leaderboard(data["loaded"], root / "out", meta=data["meta"], anchors=json.loads(json.dumps(ANCHORS)))
    return {"out": out, "md": out["md"].read_text(encoding="utf-8"), "html": out["html"].read_text(encoding="utf-8")}


def _tables(page: str) -> list[str]:
    return re.findall(r"<table[^>]*>.*?</table>", page, flags=re.S)


def test_quoted_numbers_shown_labelled_with_their_source(quoted):
    md = quoted["md"]
    rows = md_section(md, SUITE, QUOTED)
    assert rows[0] == ["Quoted from", "What", "Avg", "mnist", "svhn", "Source"]
    assert rows[2:] == [  # base < merged < quantized, as our own rows; per-task values only where quoted
        ["FusionBench", "Base (zero-shot)", "48.2", "–", "–", FB],
        ["FusionBench", "FP Task Arithmetic", "68.0", "80.5", "55.5", FB],
        ["E-PMQ paper", "GPTQ 4-bit on TIES", "99.9", "–", "–", "arXiv 2605.16882"],
    ]
    suite_md = md.split(f"\n## {SUITE}\n", 1)[1]
    assert suite_md.index("### Leaderboard") < suite_md.index(f"### {QUOTED}") < suite_md.index("### Hyperparameter")
    assert "not produced by this workflow" in suite_md.split(f"### {QUOTED}", 1)[1].split("|", 1)[0]
    assert "**Quoted numbers**" in md.split("\n## ", 2)[1]  # explained in the methodology header
    assert QUOTED not in md.split("\n## minilm/v2\n", 1)[1].split("\n## ", 1)[0]  # a suite without anchors
    assert "99.9" not in md.split(f"### {QUOTED}")[0] and "**99.9" not in md  # never bold, never in our table
    page = quoted["html"]
    (qt,) = [t for t in _tables(page) if t.startswith('<table class="quoted">')]
    assert f"<h3>{QUOTED}</h3>" in page and "table.quoted td{" in page
    assert "<td>E-PMQ paper</td><td>GPTQ 4-bit on TIES</td>" in qt and f"<td>{FB}</td>" in qt
    assert "<strong>" not in qt and 'class="mark"' not in qt
    rows = list(csv.DictReader(quoted["out"]["csv"].open()))
    assert list(rows[0]) == [*OLD_CSV_COLUMNS, "origin", "quoted_label", "quoted_source", "packed_mb"]
    q = [r for r in rows if r["origin"] == "quoted"]
    assert rows[len(rows) - len(q) :] == q  # after our rows of that suite (the last suite)
    assert [(r["quoted_label"], r["model"], r["merge"], r["method"], r["bits"], r["task"], r["metric"], r["value"])
            for r in q] == [
        ("FusionBench", "base", "", "", "", "", "mean_accuracy", "48.2000"),
        ("FusionBench", "merged", "task_arithmetic", "", "", "", "mean_accuracy", "68.0000"),
        ("FusionBench", "merged", "task_arithmetic", "", "", "mnist", "accuracy", "80.5000"),
        ("FusionBench", "merged", "task_arithmetic", "", "", "svhn", "accuracy", "55.5000"),
        ("E-PMQ paper", "quantized", "ties", "gptq", "4", "", "mean_accuracy", "99.9000"),
    ]  # fmt: skip
    assert all(r["suite"] == SUITE and r["quoted_source"] in (FB, "arXiv 2605.16882") for r in q)
    assert all(r[k] == "" for r in q for k in ("seed", "n", "stderr", "n_calib", "git_sha", "merge_params"))
    assert {r["origin"] for r in rows if r not in q} == {"ours"}


def test_quoted_numbers_change_none_of_ours(data, quoted):
    for suite, tables in ((SUITE, ("Leaderboard", "Hyperparameter sweeps", "Cost")), ("minilm/v2", ("Leaderboard",))):
        for table in tables:
            assert md_section(quoted["md"], suite, table) == md_section(data["md"], suite, table), (suite, table)
    rows = md_section(quoted["md"], SUITE, "Leaderboard")
    assert find_row(rows, "GPTQ", "TIES", "4")["Avg"].endswith("†")  # the quoted 99.9 took nothing away
    assert sum(r[-2].endswith("†") for r in rows[2:]) == 4
    assert find_row(rows, "E-PMQ", "TIES", "4")["Δ(E-PMQ − GPTQ)"].startswith("−")
    before = data["out"]["html"].read_text(encoding="utf-8")
    assert [t for t in _tables(quoted["html"]) if 'class="quoted"' not in t] == _tables(before)
    for key, path in data["out"].items():
        if key.startswith("figures/"):
            assert quoted["out"][key].read_bytes() == path.read_bytes(), key
    ours = [r for r in csv.DictReader(quoted["out"]["csv"].open()) if r["origin"] == "ours"]
    assert ours == list(csv.DictReader(data["out"]["csv"].open()))


def test_no_anchors_output_unchanged_but_for_the_origin_columns(data, tmp_path):
    for i, anchors in enumerate((None, {}, {SUITE: []})):
        again = build_leaderboard(data["loaded"], tmp_path / str(i), meta=data["meta"], anchors=anchors)
        assert set(again) == set(data["out"])
        for key, path in data["out"].items():
            assert again[key].read_bytes() == path.read_bytes(), (anchors, key)
    text = data["out"]["csv"].read_text(encoding="utf-8")
    assert "Quoted" not in data["md"] and "quoted" not in data["out"]["html"].read_text(encoding="utf-8")
    # the only CSV changes: trailing columns, `ours` and two empty cells on every row, then the packed size
    header, *lines = text.splitlines()
    assert header == ",".join([*OLD_CSV_COLUMNS, "origin", "quoted_label", "quoted_source", "packed_mb"])
    assert lines and all(re.search(r",ours,,,[0-9.]*$", ln) for ln in lines)


@pytest.mark.parametrize("anchor, message", [
    ({"label": "X", "model": "base", "value": 40.0}, r"anchors\.tiny-vit\[0\]: missing key 'source'"),
    ({"label": "X", "source": "s", "model": "base"}, r"anchors\.tiny-vit\[0\]: missing key 'value'"),
    ({"label": "X", "source": "s", "model": "base", "value": 140}, r"anchors\.tiny-vit\[0\]\.value=140"),
    ({"label": "X", "source": "s", "model": "quantized", "merge": "ties", "method": "gptq", "value": 1.0},
     r"anchors\.tiny-vit\[0\]: model='quantized' needs bits"),
    ({"label": "X", "source": "s", "model": "base", "bits": 4, "value": 1.0}, r"bits=4 on a model='base' anchor"),
    ({"label": "X", "source": "s", "model": "base", "value": 1.0, "note": "?"}, r"unknown key 'note'"),
])  # fmt: skip
def test_build_leaderboard_rejects_bad_anchors_in_one_line(data, tmp_path, anchor, message):
    with pytest.raises(EPMQError, match=message) as err:
        build_leaderboard(data["loaded"], tmp_path / "out", anchors={SUITE: [anchor]}, figures=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_build_leaderboard_rejects_anchors_of_a_suite_without_runs(data, tmp_path):
    with pytest.raises(EPMQError, match=r"^anchors\.vit-b32: no runs of suite 'vit-b32'") as err:
        build_leaderboard(data["loaded"], tmp_path / "out", anchors={"vit-b32": ANCHORS[SUITE]}, figures=False)
    assert "\n" not in str(err.value)


def _tiny_config() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())


@pytest.mark.parametrize("drop, message", [
    ("source", r"^config anchors\.tiny-vit\.0: 'source' is a required property$"),
    ("value", r"^config anchors\.tiny-vit\.0: 'value' is a required property$"),
])  # fmt: skip
def test_config_schema_rejects_an_anchor_without_source_or_value(drop, message):
    import epmq.config

    cfg = _tiny_config()
    anchor = {"label": "FusionBench", "source": FB, "model": "base", "value": 48.2}
    cfg["anchors"] = {"tiny-vit": [{k: v for k, v in anchor.items() if k != drop}]}
    with pytest.raises(EPMQError, match=message):
        epmq.config.validate(cfg)


def test_config_rejects_anchors_of_an_unknown_suite_in_one_line():
    import epmq.config

    cfg = _tiny_config()
    cfg["anchors"] = {"vit-b32": [{"label": "FusionBench", "source": FB, "model": "base", "value": 48.2}]}
    message = r"^anchors\.vit-b32: suite 'vit-b32' is not a key of suites: \(\['tiny-vit'\]\)$"
    with pytest.raises(EPMQError, match=message):
        epmq.config.validate(json.loads(json.dumps(cfg)))
    with pytest.raises(EPMQError, match=message):  # expand checks it too (a config not run through validate)
        epmq.config.expand({**cfg, "calibration": {"seeds": [0], "n_per_task": 8, "batch_size": 8}})


def test_config_anchors_default_and_paper_configs():
    import epmq.config

    cfg = _tiny_config()
    epmq.config.validate(cfg)
    assert cfg["anchors"] == {} and epmq.config.expand(cfg).quoted("tiny-vit") == []
    paper = Path(__file__).resolve().parent.parent / "configs" / "paper"
    b32 = epmq.config.load(paper / "vit-b32-8tasks.yaml").quoted("vit-b32")
    assert [(a["label"], a["model"], a["merge"], a["method"], a["bits"], a["value"]) for a in b32] == [
        ("FusionBench", "base", None, None, None, 48.2),
        ("FusionBench", "expert", None, None, None, 90.3),
        ("FusionBench", "merged", "task_arithmetic", None, None, 68.0),
        ("FusionBench", "merged", "ties", None, None, 72.2),
        ("E-PMQ paper", "quantized", "task_arithmetic", "gptq", 4, 65.0),
        ("E-PMQ paper", "quantized", "task_arithmetic", "epmq", 4, 73.6),
    ]
    l14 = epmq.config.load(paper / "vit-l14-20tasks.yaml").quoted("vit-l14")
    assert [a["value"] for a in l14] == [64.6, 94.3, 80.7, 84.0]
    assert all("8-task" in a["label"] for a in l14)  # 8-task numbers beside a 20-task run: the label says so


def test_pipeline_report_passes_anchors(data, quoted, tmp_path):
    from epmq.pipeline import report

    # the workflow's report refuses a record missing a task (the synthetic second suite has one) ...
    with pytest.raises(EPMQError, match=r"no result for task\(s\) \['sst2'\], which other minilm/v2 runs have"):
        report(data["paths"], tmp_path / "refused", meta=data["meta"], anchors=ANCHORS)
    assert not (tmp_path / "refused").exists()
    # ... and on complete records passes the anchors through as build_leaderboard does
    paths = [p for p in data["paths"] if not ('"minilm/v2"' in p.read_text() and '"quantized"' in p.read_text())]
    out = report(paths, tmp_path / "out", meta=data["meta"], anchors=ANCHORS)
    ref = build_leaderboard(load_runs(paths), tmp_path / "ref", meta=data["meta"],
                            anchors=json.loads(json.dumps(ANCHORS)))
    for key in ("csv", "md", "html"):
        assert out[key].read_bytes() == ref[key].read_bytes(), key
