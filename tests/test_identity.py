"""epmq.identity: the run identity renders the paths the workflow always wrote, and parses them back exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from epmq.errors import EPMQError
from epmq.identity import (
    Base,
    Calib,
    Expert,
    Merged,
    QuantRun,
    fmt_value,
    parse_benchmark,
    parse_eval_path,
    parse_model,
    parse_quantizer,
)

ROOT = Path(__file__).resolve().parent.parent

RUNS = [
    QuantRun("tiny-vit", "task_arithmetic", "rtn", 3, -1, 0),
    QuantRun("clip", "ties", "gptq_epmq_hessian", 4, 128, 2),
    QuantRun("tiny-vit", "task_arithmetic", "epmq", 2, -1, 1, (("lam_w", 0.1),)),
    QuantRun("tiny-vit", "task_arithmetic", "epmq", 2, -1, 1, (("lam_w", 1e-05),)),
    QuantRun("tiny-vit", "task_arithmetic", "epmq", 2, 64, 0, (("lam_w", 1.0),)),
    QuantRun("minilm", "ties", "gptq", 8, -1, 0, (("act_order", True), ("damp", 0.01))),
    QuantRun("minilm", "ties", "epmq", 3, 32, 0, (("propagation", "parallel"),)),
    QuantRun("minilm", "ties", "epmq", 3, -1, 0, (("alpha", -0.5), ("block_size", 64))),
]
MODELS = [Base("tiny-vit"), Expert("tiny-vit", "digits"), Merged("clip", "task_arithmetic"), *RUNS]


def test_paths_are_the_ones_the_workflow_always_wrote():
    r = RUNS[2]
    assert r.quantizer == "epmq.lam_w=0.1" and r.run_id == "task_arithmetic/epmq.lam_w=0.1/w2g-1/s1"
    assert r.model_id == "quant/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1"
    assert r.weights("results") == "results/tiny-vit/quant/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1.safetensors"
    assert r.record("results") == "results/tiny-vit/quant/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1.json"
    assert r.eval_record("res") == "res/tiny-vit/eval/quant/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1.json"
    assert r.benchmark() == "benchmarks/quantize/tiny-vit/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1.tsv"
    assert r.job_file("logs", "quantize", ".log") == \
        "logs/quantize/tiny-vit/task_arithmetic/epmq.lam_w=0.1/w2g-1/s1.log"
    assert [RUNS[i].quantizer for i in (3, 4, 5, 7)] == [
        "epmq.lam_w=1e-05", "epmq.lam_w=1", "gptq.act_order=true.damp=0.01", "epmq.alpha=-0.5.block_size=64"]
    assert r.merged().weights("R") == "R/tiny-vit/merged/task_arithmetic.safetensors"
    assert r.calib(32).weights("R") == "R/tiny-vit/calib/n32_s1.safetensors"
    assert Base("s").weights("R") == "R/s/base.safetensors" and Base("s").eval_record("R") == "R/s/eval/base.json"
    assert Expert("s", "mnist").weights("R") == "R/s/experts/mnist.safetensors"
    assert Expert("s", "mnist").eval_record("R") == "R/s/eval/experts/mnist.json"
    assert Merged("s", "ties").record("R") == "R/s/merged/ties.json"


def test_patterns_are_the_rules_wildcard_patterns():
    from epmq.pipeline import PATTERNS

    assert PATTERNS == {
        "base": "{results}/{suite}/base.safetensors",
        "expert": "{results}/{suite}/experts/{task}.safetensors",
        "merged": "{results}/{suite}/merged/{merge}.safetensors",
        "calib": "{results}/{suite}/calib/n{n}_s{seed}.safetensors",
        "quant": "{results}/{suite}/quant/{merge}/{quantizer}/w{bits}g{group}/s{seed}.safetensors",
        "eval": "{results}/{suite}/eval/{model}.json",
    }
    assert QuantRun.job_pattern("logs", "quantize", ".log") == \
        "logs/quantize/{suite}/{merge}/{quantizer}/w{bits}g{group}/s{seed}.log"
    assert Base.job_pattern("logs", "base", ".log") == "logs/base/{suite}.log"
    assert Expert.job_pattern("benchmarks", "expert", ".tsv") == "benchmarks/expert/{suite}/{task}.tsv"
    assert Calib.job_pattern("logs", "calibrate", ".log") == "logs/calibrate/{suite}/n{n}_s{seed}.log"


def test_fmt_value_rules():
    assert [fmt_value(v) for v in (0.1, 1e-05, 1.0, 2, True, False, "bf16", 0.0, -0.5, 1e20, 1234567.0)] == [
        "0.1", "1e-05", "1", "2", "true", "false", "bf16", "0.0", "-0.5", "1e+20", "1234567.0"]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{m.suite}:{m.model_id}")
def test_parse_of_render_is_the_model(model):
    assert parse_model(model.suite, model.model_id) == model
    assert parse_eval_path(model.eval_record("results")) == model
    assert parse_eval_path(Path("/abs/eval/x") / model.eval_record("results")) == model  # read from the end
    if isinstance(model, QuantRun):
        back = parse_model(model.suite, model.model_id)
        assert back.variant == model.variant and back.quantizer == model.quantizer
        assert parse_benchmark(model.benchmark()) == model
        w = re.fullmatch(r"(?P<merge>[^/]+)/(?P<quantizer>[^/]+)/w(?P<bits>\d+)g(?P<group>-?\d+)/s(?P<seed>\d+)",
                         model.run_id).groupdict()  # a quantize job's wildcards
        assert QuantRun.from_wildcards({"suite": model.suite, **w}) == model


def test_a_parsed_sweep_value_has_the_type_its_text_reads_and_the_grid_gives_the_configs():
    import yaml

    import epmq.config

    run = parse_model("tiny-vit", "quant/task_arithmetic/epmq.lam_w=1/w3g-1/s0")
    assert run.variant == (("lam_w", 1),) and type(run.variant[0][1]) is int
    assert parse_quantizer("epmq.sym=false.lam_w=1e-05.propagation=parallel") == (
        "epmq", (("sym", False), ("lam_w", 1e-05), ("propagation", "parallel")))
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())  # sweeps lam_w over [1.0]
    epmq.config.validate(cfg)
    grid = epmq.config.expand(cfg)
    mine = grid.quant_run(run)
    assert mine == run and type(mine.variant[0][1]) is float
    assert grid.quant_run(parse_model("tiny-vit", "quant/task_arithmetic/gptq/w5g-1/s0")).bits == 5  # off the grid
    assert len(set(grid.runs)) == len(grid.runs) and all(grid.quant_run(r) is r for r in grid.runs)


def test_runs_are_equal_when_their_ids_are():
    a = QuantRun("s", "m", "epmq", 3, -1, 0, (("lam_w", 1),))
    assert a == QuantRun("s", "m", "epmq", 3, -1, 0, (("lam_w", 1.0),)) == QuantRun("s", "m", "epmq", 3, -1, 0,
                                                                                      {"lam_w": 1})
    assert len({a, QuantRun("s", "m", "epmq", 3, -1, 0, (("lam_w", 1.0),))}) == 1
    assert a != QuantRun("t", "m", "epmq", 3, -1, 0, (("lam_w", 1),)) and a != Merged("s", "m")


@pytest.mark.parametrize("model_id", [
    "quant/ta/gptq/w03g-1/s0",  # not canonical
    "quant/ta/gptq/w3g-01/s0",
    "quant/ta/gptq/w3g-1",  # too short
    "quant/ta/gptq/w3g-1/s0/x",
    "quant/ta/gptq/3g-1/s0",
    "quant/ta/gptq/w3g1.5/s0",
    "quant/ta/epmq.lam_w=0.10/w3g-1/s0",  # reads back as 0.1
    "quant/ta/epmq.lam_w/w3g-1/s0",
    "quant/ta/epmq./w3g-1/s0",
    "quant/ta/ep-mq/w3g-1/s0",
    "quant//gptq/w3g-1/s0",
    "experts/",
    "experts/a/b",
    "merged/a/b",
    "merged",
    "base/x",
    "bases",
    "",
    "quantized/ta/gptq/w3g-1/s0",
])
def test_bad_ids_are_one_line_errors_naming_the_string(model_id):
    with pytest.raises(EPMQError) as err:
        parse_model("tiny-vit", model_id)
    msg = str(err.value)
    assert "\n" not in msg and repr(model_id) in msg or model_id in msg, msg


@pytest.mark.parametrize("path", ["results/tiny-vit/eval/quant/ta/gptq/w3g-1.json", "eval/base.json",
                                  "results/tiny-vit/evals/base.json", "results/tiny-vit/eval/base.tsv", "x.json"])
def test_bad_eval_paths(path):
    with pytest.raises(EPMQError, match="not a run record path") as err:
        parse_eval_path(path)
    assert path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("path", ["benchmarks/quantize/tiny-vit/ta/gptq/w3g-1.tsv",
                                  "benchmarks/evaluate/tiny-vit/ta/gptq/w3g-1/s0.tsv",
                                  "benchmarks/quantize/tiny-vit/ta/gptq/w3g-1/s0.json"])
def test_bad_benchmark_paths(path):
    with pytest.raises(EPMQError, match="not a quantize benchmark path") as err:
        parse_benchmark(path)
    assert path in str(err.value)


def test_bad_fields_are_refused_when_built():
    for bad in (dict(merge="a/b"), dict(method="ep mq"), dict(variant=(("lam_w", "a/b"),)), dict(bits="3")):
        kw = {"suite": "s", "merge": "m", "method": "gptq", "bits": 3, "group_size": -1, "seed": 0, **bad}
        with pytest.raises(EPMQError):
            QuantRun(**kw)
    with pytest.raises(EPMQError, match="seed='x'"):
        QuantRun.from_wildcards({"suite": "s", "merge": "m", "quantizer": "gptq", "bits": "3", "group": "-1",
                                 "seed": "x"})
    with pytest.raises(EPMQError, match="suite"):
        Base("a/b")
    assert Calib.from_wildcards({"suite": "s", "n": "32", "seed": "1"}) == Calib("s", 32, 1)


def test_benchmarks_join_their_run_records():
    from epmq.report.runs import match_benchmarks

    evals = [m.eval_record("results") for m in MODELS] + ["elsewhere/by_hand.json"]
    benches = [r.benchmark() for r in RUNS[::-1]]
    got = match_benchmarks(evals, benches)
    assert got == [None] * 3 + [Path(r.benchmark()) for r in RUNS] + [None]
    assert match_benchmarks(evals, benches[:1]) == [None] * (len(evals) - 2) + [Path(benches[0]), None]
    with pytest.raises(EPMQError, match="logs/x.tsv: not a quantize benchmark path"):
        match_benchmarks(evals, ["logs/x.tsv"])


def test_a_record_whose_values_disagree_with_its_id_is_refused():
    from epmq.pipeline import _variant

    run = parse_model("s", "quant/m/epmq.lam_w=1/w3g-1/s0")
    assert _variant(run, {"quant_params": {"lam_w": 1.0}}) == {"lam_w": 1.0}  # the record's own value
    with pytest.raises(EPMQError, match=r"quant/m/epmq.lam_w=1/w3g-1/s0: its quantize record has lam_w=0.5"):
        _variant(run, {"quant_params": {"lam_w": 0.5}})
