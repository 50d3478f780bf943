"""The route for data-aware merges (RegMean, feature calibration): a method that declares
``needs_calibration`` gets the train split's calibration batches, a model factory and the adapter in its
``prepare`` pass -- through the driver, the pipeline's merge stage and the workflow's merge rule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from epmq.errors import EPMQError
from epmq.merge import MergeData, MergeMethod, merge_state_dicts, registry


def _weighted(base, experts, *, weights, lam=1.0):
    """Σ_t w_t θ_t / Σ_t w_t: the tensor function of the toy method."""
    total = sum(w * e.float() for w, e in zip(weights, experts))
    return total / sum(weights)


def _energy_prepare(load, keys, hparams, data):
    """Weight each expert by the mean squared output of its own model on its task's calibration batches."""
    weights = []
    for t, batches in enumerate(data.calib):
        model = data.new_model()
        model.load_state_dict({k: load(k)[1][t] for k in keys}, strict=False)
        with torch.no_grad():
            outs = [data.adapter.run(model.eval(), b) for b in batches]
        weights.append(float(torch.cat([o.reshape(len(o), -1) for o in outs]).pow(2).mean()))
    return {**hparams, "weights": weights}


TOY = MergeMethod(name="energy_average", fn=_weighted, paper="(a test)", description="toy data-aware merge",
                  defaults={"lam": 1.0}, prepare=_energy_prepare, needs_calibration=True, label="Energy avg")


def test_driver_hands_the_data_to_prepare_and_its_result_to_the_tensor_function():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(3, 2).state_dict() for _ in range(2)]
    calib = [[torch.randn(4, 3)], [torch.randn(2, 3), torch.randn(3, 3)]]
    data = MergeData(calib=calib, new_model=lambda: torch.nn.Linear(3, 2),
                     adapter=SimpleNamespace(run=lambda m, b: m(b)))
    merged = merge_state_dicts(experts[0], experts, TOY, data=data, exclude=())
    w = []
    for sd, batches in zip(experts, calib):
        x = torch.cat(batches)
        w.append(float((x @ sd["weight"].T + sd["bias"]).pow(2).mean()))
    for k in ("weight", "bias"):
        want = (w[0] * experts[0][k] + w[1] * experts[1][k]) / (w[0] + w[1])
        torch.testing.assert_close(merged[k], want)


def test_a_data_aware_merge_without_data_is_one_line():
    sd = torch.nn.Linear(3, 2).state_dict()
    with pytest.raises(EPMQError, match="energy_average reads calibration data"):
        merge_state_dicts(sd, [sd], TOY)


def test_a_data_aware_method_must_declare_how_it_reads_the_data():
    with pytest.raises(EPMQError, match="needs_calibration without a prepare pass"):
        MergeMethod(name="x", fn=_weighted, paper="", description="", needs_calibration=True)


def test_every_registered_method_has_a_label_and_the_report_shows_it():
    from epmq.report.names import merge_name

    for name, m in registry.METHODS.items():
        assert m.label and merge_name(name) == m.label
    assert merge_name("task_arithmetic") == "Task Arithmetic" and merge_name("my_id") == "my_id"


def test_pipeline_merge_reads_the_calibration_file(tiny_run, tmp_path, monkeypatch):
    """The real stage on configs/tiny.yaml's built suite: the toy method reads the calibration batches through
    the suite's own model factory and adapter; without a calibration file it is refused in one line."""
    from epmq import pipeline
    from epmq.config import load

    monkeypatch.setitem(registry.METHODS, TOY.name, TOY)
    monkeypatch.chdir(tiny_run)
    grid = load("tiny.yaml")
    spec = pipeline.suite_spec(grid, "tiny-vit")
    calib = next((tiny_run / "results-tiny" / "tiny-vit" / "calib").glob("*_s0.safetensors"))
    out = tmp_path / "merged" / "toy.safetensors"
    rec = pipeline.merge(spec, "toy", TOY.name, {}, {}, out, calib=calib)
    assert rec["calibration"] == calib.name and out.is_file()
    assert json.loads(out.with_suffix(".json").read_text())["method"] == TOY.name
    with pytest.raises(EPMQError, match="energy_average reads calibration data: give it a calibration file"):
        pipeline.merge(spec, "toy", TOY.name, {}, {}, tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()


def test_the_grid_gives_a_data_aware_merge_the_first_seeds_calibration_file(monkeypatch):
    """What the merge rule declares as its input (and the CLI passes): only data-aware merges read one."""
    from epmq.config import expand, validate

    monkeypatch.setitem(registry.METHODS, TOY.name, TOY)
    cfg = {"suites": {"tiny-vit": {}}, "merges": {"task_arithmetic": {}, "toy": {"method": "average"}},
           "quantize": {"methods": ["gptq"], "bits": [3]}, "calibration": {"seeds": [2, 0], "n_per_task": 8}}
    validate(cfg)
    cfg["merges"]["toy"]["method"] = TOY.name  # (the schema's enum lists the shipped methods only)
    grid = expand(cfg)
    assert grid.merge_calib("tiny-vit", "task_arithmetic") is None
    assert grid.merge_calib("tiny-vit", "toy") == "results/tiny-vit/calib/n8_s2.safetensors"
