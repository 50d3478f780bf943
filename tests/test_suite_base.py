"""The suite skeleton (epmq.suites.base): the one evaluation loop, build_all, the option check -- on a stand-in
suite without models; and that no suite module imports another suite module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from epmq.errors import EPMQError
from epmq.suites.base import Suite, mean_accuracy

SUITES_DIR = Path(__file__).resolve().parent.parent / "epmq" / "suites"


class _Stub(Suite):
    """A suite whose 'encoder' is a dict of accuracies; it records the order of its evaluations."""

    name = "stub"
    adapter = "none"
    DEFAULTS = {"tasks": ("b", "a", "c"), "depth": 1}

    def __init__(self, cache_dir, **options):
        super().__init__(cache_dir, **options)
        self.cfg = self.with_defaults(options)
        self.tasks = tuple(self.cfg["tasks"])
        self.calls = []

    def new_encoder(self):
        return {}

    def load_encoder(self, weights):
        return {"weights": str(weights)}

    def build_base_weights(self):
        self.calls.append("base")
        return self.base_path

    def build_base(self):
        self.calls.append("base+heads")
        return self.base_path

    def build_expert(self, task):
        self.calls.append(f"expert {task}")
        return self.expert_path(task)

    def head(self, task):
        return None if not self.has_heads else task

    def calibration_batches(self, task, n, *, seed, batch_size=32):
        return []

    def evaluate(self, encoder, task, *, split="test"):
        self.calls.append(f"eval {task}/{split}")
        return {"task": task, "split": split, "accuracy": encoder[task]}


def test_evaluate_all_runs_every_task_in_order_and_means_them(tmp_path):
    suite = _Stub(tmp_path)
    acc = {"a": 0.1, "b": 0.2, "c": 0.7}
    out = suite.evaluate_all(acc, split="validation")
    assert suite.calls == ["eval b/validation", "eval a/validation", "eval c/validation"]
    assert list(out["tasks"]) == ["b", "a", "c"]
    assert out["mean"] == (0.2 + 0.1 + 0.7) / 3 == mean_accuracy(out["tasks"])  # summed in task order


def test_build_all_and_encoders(tmp_path):
    suite = _Stub(tmp_path, tasks=("a", "b"))
    paths = suite.build_all()
    assert suite.calls == ["base+heads", "expert a", "expert b"]
    assert paths == {"base": tmp_path / "base.safetensors",
                     "heads": {t: tmp_path / "heads" / f"{t}.safetensors" for t in "ab"},
                     "experts": {t: tmp_path / "experts" / f"{t}.safetensors" for t in "ab"}}
    assert suite.base_encoder() == {"weights": str(tmp_path / "base.safetensors")}
    assert suite.expert_encoder("b") == {"weights": str(tmp_path / "experts" / "b.safetensors")}
    headless = _Stub(tmp_path, tasks=("a",))
    headless.has_heads = False
    assert "heads" not in headless.build_all()


def test_unknown_option_and_task_name_the_culprit(tmp_path):
    with pytest.raises(EPMQError, match=r"^stub suite: unknown option\(s\) \['dpeth'\]; expected some of "
                                        r"\['depth', 'tasks'\]$"):
        _Stub(tmp_path, dpeth=2)
    with pytest.raises(EPMQError, match="task='d': not a task of the stub suite"):
        _Stub(tmp_path).expert_path("d")


def test_no_suite_module_imports_another_suite_module():
    suite_modules = {p.stem for p in SUITES_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    for path in SUITES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("epmq.suites"):
                continue
            named = [node.module.split(".")[2]] if node.module != "epmq.suites" else [a.name for a in node.names]
            for other in named:
                assert other not in suite_modules or other == path.stem, f"{path.name} imports suite {other}"
