"""The quantizer registry (epmq.quant.methods): its invariants, and that a new quantizer is one object that the
engine, the config, the CLI and the report pick up without a change anywhere else."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import epmq.config
from epmq.errors import EPMQError
from epmq.quant import METHODS, QuantMethod, Quantizer
from epmq.quant.methods import registry
from epmq.report import names

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- invariants


def test_registry_is_one_object_per_file_in_table_order():
    import epmq.quant.methods as M

    assert QuantMethod is Quantizer and M.METHODS is METHODS
    assert list(METHODS) == ["rtn", "gptq", "epmq", "epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian"]
    for name, q in METHODS.items():
        assert q.name == name
        mod = __import__(f"epmq.quant.methods.{name}", fromlist=["_"])
        assert [v for v in vars(mod).values() if isinstance(v, Quantizer)] == [q]  # its file defines it, alone
    assert [q.order for q in METHODS.values()] == sorted(q.order for q in METHODS.values())
    with pytest.raises(Exception):
        METHODS["gptq"].label = "other"  # frozen


def test_schema_enum_equals_the_registry():
    schema = yaml.safe_load(epmq.config.schema_path().read_text())
    assert schema["properties"]["quantize"]["properties"]["methods"]["items"]["enum"] == list(METHODS)


def test_display_is_distinct_and_complete():
    qs = list(METHODS.values())
    for attr in ("order", "colour", "label"):
        values = [getattr(q, attr) for q in qs]
        assert all(v != "" for v in values) and len(set(values)) == len(values), attr
    assert all(q.colour.startswith("#") and len(q.colour) == 7 for q in qs)
    assert [q.name for q in qs if q.baseline] == ["gptq"] and [q.name for q in qs if q.headline] == ["epmq"]
    assert [q.name for q in qs if not q.ranked] == ["epmq_unrounded"]
    assert [q.name for q in qs if q.ablation] == ["epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian"]


def test_what_each_method_needs_and_reads():
    needs = {n: (q.needs_calibration, q.needs_experts) for n, q in METHODS.items()}
    assert needs == {"rtn": (False, False), "gptq": (True, False), "epmq": (True, True),
                     "epmq_unrounded": (True, True), "gptq_corrected": (True, True),
                     "gptq_epmq_hessian": (True, True)}
    assert METHODS["rtn"].knobs == ("sym",)
    assert "damp" in METHODS["gptq"].knobs and "lam_w" not in METHODS["gptq"].knobs
    for q in METHODS.values():
        assert set(q.knobs) <= set(epmq.config.QUANT_KNOBS), q.name
        assert epmq.config.relevant_knobs(q) == q.knobs


def test_report_names_come_from_the_registry():
    from epmq.report import METHOD_NAMES
    from epmq.report.tables import DELTA_HEADER

    assert METHOD_NAMES == {n: q.label for n, q in METHODS.items()}
    assert DELTA_HEADER == "Δ(E-PMQ \u2212 GPTQ)"
    assert names.main_methods() == ("rtn", "gptq", "epmq")
    assert names.ablation_methods() == ("epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian")
    assert names.unranked_methods() == frozenset({"epmq_unrounded"})
    assert sorted(["zzz", *reversed(list(METHODS))], key=names.method_rank) == [*METHODS, "zzz"]


def test_registry_rejects_clashes():
    rtn, gptq = METHODS["rtn"], METHODS["gptq"]
    with pytest.raises(EPMQError, match="'rtn2': colour '#7f7f7f' is already taken by 'rtn'"):
        registry([rtn, Quantizer("rtn2", "merged", None, "rtn", "x", label="R2", order=11, colour=rtn.colour)])
    with pytest.raises(EPMQError, match="order 20 is already taken by 'gptq'"):
        registry([gptq, Quantizer("g2", "merged", "pooled", "gptq", "x", order=20, colour="#000000")])
    with pytest.raises(EPMQError, match="at most one may be the baseline"):
        registry([gptq, Quantizer("g2", "merged", "pooled", "gptq", "x", order=21, colour="#000000", baseline=True)])


def test_registry_imports_no_torch():
    code = ("import sys, epmq.quant, epmq.config, epmq.report.names, epmq.cli; "
            "assert epmq.quant.METHODS and 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_rejects_an_unknown_method_in_one_line(tmp_path):
    r = subprocess.run([str(Path(sys.executable).parent / "epmq"), "quantize", "--config",
                        str(ROOT / "configs" / "tiny.yaml"), "--suite", "tiny-vit", "--merge", "task_arithmetic",
                        "--method", "gptaq", "--bits", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--method=gptaq: expected one of ['rtn', 'gptq', 'epmq'" in r.stderr


# ---------------------------------------------------------------------------------------------- a new quantizer

#: a quantizer added as one object: RTN of E-PMQ's target (no rounding code of its own), shown between E-PMQ and
#: the other ablations
TOY = Quantizer("epmq_rtn", "epmq", None, "rtn", "toy: RTN of the E-PMQ target", ablation=True,
                label="E-PMQ target, RTN", order=35, colour="#17becf")


class CountingRTN(Quantizer):
    """A subclass with its own rounding step (what a GPTAQ plug-in overrides): here RTN, counting its calls."""

    calls: list = []

    def round_sites(self, cfg, plans):
        CountingRTN.calls.append([p.full for p in plans])
        return super().round_sites(cfg, plans)


def _run(model, acc, *, merge=None, method=None, bits=None, seed=None) -> dict:
    """A run record (schema 1) of one task with ``acc`` % correct out of 1000."""
    p = round(acc * 10) / 1000
    task = {"task": "mnist", "split": "test", "n": 1000, "correct": round(acc * 10), "accuracy": 100 * p,
            "stderr": 100 * (p * (1 - p) / 1000) ** 0.5}
    return {"schema": 1, "suite": "tiny-vit", "model": model, "expert_task": None, "merge": merge,
            "merge_params": {}, "method": method, "bits": bits, "group_size": -1 if model == "quantized" else None,
            "variant": {}, "quant_params": {}, "seed": seed, "n_calib": 8 if seed is not None else None,
            "split": "test", "tasks": {"mnist": task},
            "cost": {"quantize_seconds": None, "peak_rss_mb": None, "gpu_mb": None},
            "provenance": {"epmq": "0", "torch": "0", "git_sha": "0"}}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    return TOY


def test_a_new_quantizer_is_shown_by_the_report(toy, tmp_path):
    from epmq.report import build_leaderboard
    from epmq.report.figures import _method_color

    assert names.method_name("epmq_rtn") == "E-PMQ target, RTN"
    assert names.ablation_methods() == ("epmq_rtn", "epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian")
    assert sorted(METHODS, key=names.method_rank) == ["rtn", "gptq", "epmq", "epmq_rtn", "epmq_unrounded",
                                                     "gptq_corrected", "gptq_epmq_hessian"]
    assert _method_color("epmq_rtn", []) == "#17becf"
    assert epmq.config.relevant_knobs(toy) == METHODS["epmq"].knobs
    runs = [_run("base", 40.0), _run("merged", 85.0, merge="task_arithmetic")]
    for i, m in enumerate(["gptq_corrected", "epmq_rtn", "epmq", "gptq", "rtn"]):
        runs.append(_run("quantized", 80.0 + i, merge="task_arithmetic", method=m, bits=4, seed=0))
    md = build_leaderboard(runs, tmp_path, figures=False)["md"].read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if "| 4 |" in line]
    assert rows == ["RTN", "GPTQ", "E-PMQ", "E-PMQ target, RTN", "GPTQ on E-PMQ-corrected model"]
    assert "*E-PMQ target, RTN*; *E-PMQ target, unrounded*" in md  # the methodology's list of ablations


def test_a_new_quantizer_runs_in_the_engine(toy, monkeypatch):
    """The engine knows the toy only through its plan/round_group: with statistics from the full-precision model
    (fp propagation: the same targets for both), its weights are RTN of E-PMQ's unrounded target W*, and a
    subclass's own rounding step is called once per group."""
    import torch

    from epmq.engine import QuantConfig, quantize_model
    from epmq.models.openclip import tiny_vision_transformer
    from epmq.quant.rounding import rtn

    torch.manual_seed(0)
    merged = tiny_vision_transformer(width=32, layers=1, heads=2).eval()
    g = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(2):
        e = copy.deepcopy(merged)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        experts.append(e)
    calib = [[torch.randn(4, 3, 28, 28, generator=g)] for _ in range(2)]

    def run(method):
        model = copy.deepcopy(merged)
        cfg = QuantConfig(method=method, bits=3, propagation="fp")
        return model, quantize_model(model, calib, cfg, experts=experts, progress=False)

    target, _ = run("epmq_unrounded")
    model, report = run("epmq_rtn")
    assert report.results and {r["layer"] for r in report.layers} >= set(report.results)
    w_star = target.state_dict()
    for name, res in report.results.items():
        assert torch.equal(res.weight, rtn(w_star[name].float(), 3, group_size=-1, sym=False).weight), name
        assert res.codes.max() <= 7

    counting = CountingRTN("counting_rtn", "merged", None, "rtn", "toy", order=36, colour="#393b79")
    monkeypatch.setitem(METHODS, counting.name, counting)
    CountingRTN.calls.clear()
    _, report = run("counting_rtn")
    assert sorted(n for call in CountingRTN.calls for n in call) == sorted(r["layer"] for r in report.layers)
