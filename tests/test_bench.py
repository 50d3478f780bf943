"""Smoke test of bench/quantize_bench.py: its core function on a tiny configuration (not a benchmark)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quantize_bench.py"


@pytest.fixture(scope="module")
def qb():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")
    spec = importlib.util.spec_from_file_location("quantize_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_core_writes_csv(qb, tmp_path):
    out = tmp_path / "r.csv"
    args = qb.parse_args(["--device", "cpu", "--blocks", "1", "--tasks", "2", "--n-per-task", "2",
                          "--batch-size", "2", "--image-size", "64", "--width", "64", "--group-size", "32",
                          "--no-isolate", "--out", str(out)])
    rows = qb.bench(args)
    qb.write_csv(rows, out)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == qb.CSV_COLUMNS
        got = list(reader)
    assert [r["variant"] for r in got] == list(qb.VARIANTS)
    for r in got:
        assert float(r["seconds"]) > 0 and float(r["peak_rss_mb"]) > 0
        assert int(r["n_layers"]) == 4 and float(r["mean_rel_err"]) > 0
        assert r["arch"] == "ViT-B-32" and r["bits"] == "4" and r["tasks"] == "2" and r["torch_version"]
    ref = got[0]
    assert float(ref["rel_err_diff_vs_reference"]) == 0 and float(ref["speedup_vs_reference"]) == 1
    assert float(got[1]["rel_err_diff_vs_reference"]) < 0.5  # gptq: the same procedure as the reference
    assert "reference" in qb.format_table(rows)


def test_bench_layers_compares_engines(qb, tmp_path):
    args = qb.parse_args(["--device", "cpu", "--width", "64", "--image-size", "32", "--group-size", "32",
                          "--block-size", "32"])
    rows = qb.bench_layers(args)
    assert [r["layer"] for r in rows[:-1]] == ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight",
                                               "mlp.c_proj.weight"]
    assert [(r["d_out"], r["d_in"]) for r in rows[:-1]] == [(192, 64), (64, 64), (256, 64), (64, 256)]
    assert rows[-1]["per_model"] == 4 * 12  # ViT-B-32 has 12 blocks
    for r in rows:
        assert r["plain_seconds"] > 0 and r["fast_seconds"] > 0
        assert r["codes_identical"] == 1.0 and r["max_abs_diff"] == 0.0  # CPU kernels are bit-identical
    out = tmp_path / "l.csv"
    qb.write_csv(rows, out, qb.LAYER_COLUMNS)
    with open(out, newline="") as f:
        assert csv.DictReader(f).fieldnames == qb.LAYER_COLUMNS
    assert "whole model" in qb.format_layers(rows)


def test_bench_streamed_experts_match_in_memory(qb, tmp_path):
    """--experts-dir: the experts go to safetensors (reused when current) and are read lazily; the merged
    weights, the experts' tensors and the E-PMQ result equal the in-memory setup's."""
    import torch

    from epmq.merge.driver import SafetensorsStateDict

    argv = ["--device", "cpu", "--blocks", "1", "--tasks", "2", "--n-per-task", "2", "--batch-size", "2",
            "--image-size", "64", "--width", "64", "--group-size", "32", "--no-isolate"]
    mem = qb.parse_args(argv)
    streamed = qb.parse_args(argv + ["--experts-dir", str(tmp_path / "ex"), "--variants", "epmq"])
    paths = qb.write_experts(streamed)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert qb.write_experts(streamed) == paths and [p.stat().st_mtime_ns for p in paths] == mtimes  # reused
    m_model, m_experts, m_calib = qb.setup(mem)
    s_model, s_experts, s_calib = qb.setup(streamed)
    assert all(isinstance(e, SafetensorsStateDict) for e in s_experts)
    for k, v in m_model.state_dict().items():
        assert torch.equal(v, s_model.state_dict()[k]), k
        assert all(torch.equal(a[k], b[k]) for a, b in zip(m_experts, s_experts)), k
    rows = qb.bench(streamed)
    assert [r["variant"] for r in rows] == ["epmq"] and rows[0]["experts_streamed"] is True
    assert rows[0]["speedup_vs_reference"] != rows[0]["speedup_vs_reference"]  # NaN: no reference run
    mem_rows = {r["variant"]: r for r in qb.bench(mem)}
    assert rows[0]["mean_rel_err"] == pytest.approx(mem_rows["epmq"]["mean_rel_err"], rel=1e-6)
    streamed.tasks = 3  # other settings: the files are rewritten
    assert len(qb.write_experts(streamed)) == 3


def test_bench_rejects_unknown_variant(qb):
    with pytest.raises(SystemExit):
        qb.parse_args(["--variants", "gptq,fast"])


def test_grams_bench_compares_stats_dtypes(tmp_path):
    """bench/grams_bench.py on tiny widths: both settings timed, the bf16 statistics equal the float64 products
    of the rounded inputs (the sums are not rounded), and differ from fp32 by the input rounding only."""
    spec = importlib.util.spec_from_file_location("grams_bench", BENCH.with_name("grams_bench.py"))
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    import torch

    rows = gb.bench([8, 40], tokens=64, batches=2, repeats=1, device=torch.device("cpu"))
    assert [r["d_in"] for r in rows] == [8, 40]
    for r in rows:
        assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0
        assert r["bf16_vs_rounded"] < 1e-6
        assert 0 < r["bf16_vs_fp32"] < 1e-2
    out = tmp_path / "g.csv"
    gb.write_csv(rows, out)
    assert csv.DictReader(open(out)).fieldnames == gb.COLUMNS
    assert [row["d_in"] for row in csv.DictReader(open(out))] == ["8", "40"]
    assert "bf16_vs_rounded" in gb.format_table(rows)


def test_precision_bench_smoke(tmp_path, capsys):
    """bench/precision_bench.py on a tiny batch: both rows, the CPU's bf16 flags named, the CSV written."""
    import csv

    spec = importlib.util.spec_from_file_location("precision_bench", BENCH.with_name("precision_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.csv"
    mod.main(["--batch", "2", "--tokens", "4", "--repeats", "1", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["work"] for r in rows] == ["train", "forward"] and all(float(r["bf16_vs_fp32"]) > 0 for r in rows)
    assert "CPU bf16 flags:" in capsys.readouterr().out
