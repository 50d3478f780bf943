"""A corpus of bad inputs: each is refused before any work with ONE line naming the culprit (the key, the
value, the file), and nothing partial is left behind. Config cases go through the same validation the
Snakefile and the CLI run (epmq.config.validate + expand); CLI cases through `epmq`; artefact cases through
the readers the jobs use."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import epmq.config
from epmq.errors import EPMQError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_report import make_run  # noqa: E402 (the report tests' record builder)

TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _check(cfg):
    cfg = copy.deepcopy(cfg)
    epmq.config.validate(cfg)
    return epmq.config.expand(cfg)


def _edit(path: str, value):
    cfg = copy.deepcopy(TINY)
    *head, last = path.split(".")
    node = cfg
    for k in head:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


CONFIG_CASES = [
    # (edit path, bad value, the one-line message must contain)
    ("quantize.sweeps.0.values", ["abc"], "quantize.sweeps[0].values[0].lam_w='abc': 'abc' is not of type 'number'"),
    ("quantize.sweeps.0.values", [-1.0], "quantize.sweeps[0].values[0].lam_w=-1.0"),
    ("quantize.sweeps.0.values", [True], "quantize.sweeps[0].values[0].lam_w=True"),
    ("quantize.params.sym", "maybe", "config quantize.params.sym: 'maybe' is not of type 'boolean'"),
    ("quantize.params.damp", 0, "config quantize.params.damp"),
    ("suites.tiny-vit.options.width", "big", "suites.tiny-vit.options.width='big': expected an integer"),
    ("suites.tiny-vit.options.expert_lr", "fast", "suites.tiny-vit.options.expert_lr='fast': expected a number"),
    ("suites.tiny-vit.options.expert_lr", float("nan"), "suites.tiny-vit.options.expert_lr=nan: expected a finite"),
    ("suites.tiny-vit.options.wdith", 32, "suites.tiny-vit.options.wdith: not an option of suite type tiny-vit"),
    ("suites.tiny-vit.options.tasks", "digits", "suites.tiny-vit.options.tasks='digits': expected a list"),
    ("suites.tiny-vit.quantize", {"lam_w": "x"}, "config suites.tiny-vit.quantize.lam_w: 'x' is not of type 'number'"),
    ("suites.tiny-vit.quantize", {"lamw": 1.0},
     "config suites.tiny-vit.quantize: Additional properties are not allowed ('lamw'"),
    ("merges.task_arithmetic.params", {"lam": "big"}, "merges.task_arithmetic.params.lam='big': expected a number"),
    ("merges.task_arithmetic.select", {"lam": [0.3, "x"]}, "merges.task_arithmetic.select.lam[1]='x'"),
    ("merges.task_arithmetic.select", {"lam": []}, "merges.task_arithmetic.select.lam"),
    ("merges.task_arithmetic.params", {"lamda": 0.3}, "merges.task_arithmetic: 'lamda' is not a parameter"),
    ("quantize.group_size", [7], "config quantize.group_size.0: 7 is not one of"),
    ("quantize.bits", [9], "config quantize.bits.0: 9 is greater than the maximum of 8"),
    ("calibration.seeds", [], "config calibration.seeds: [] should be non-empty"),
    ("calibration.n_per_task", 0, "config calibration.n_per_task: 0 is less than the minimum of 1"),
]


@pytest.mark.parametrize("path,value,message", CONFIG_CASES, ids=[c[0] + "=" + repr(c[1]) for c in CONFIG_CASES])
def test_bad_config_value_is_one_line_naming_it(path, value, message):
    with pytest.raises(EPMQError) as e:
        _check(_edit(path, value))
    text = str(e.value)
    assert "\n" not in text and message in text, text


def test_hub_experts_option_takes_a_format_string_or_a_mapping():
    from epmq.config import check_like

    check_like("suites.c.options.experts", {"mnist": "path/a"}, "tanganke/x_{task}")
    check_like("suites.c.options.experts", "org/x_{task}", "tanganke/x_{task}")
    with pytest.raises(EPMQError, match=r"suites.c.options.experts=3: expected a string"):
        check_like("suites.c.options.experts", 3, "tanganke/x_{task}")
    with pytest.raises(EPMQError, match=r"suites.c.options.base=\{'a': 1\}: expected a string"):
        check_like("suites.c.options.base", {"a": 1}, "openai/clip")


def test_the_shipped_configs_pass_the_checks():
    for f in [ROOT / "config.yaml", *sorted((ROOT / "configs").rglob("*.yaml"))]:
        _check(yaml.safe_load(f.read_text()))


def test_a_sweep_value_that_would_break_a_path_is_refused():
    with pytest.raises(EPMQError, match=r"'a/b' becomes part of a file path"):
        epmq.config.check_path_component("quantize.sweeps[0].values[0]", "a/b")
    with pytest.raises(EPMQError, match=r"'\.\.' becomes part of a file path"):
        epmq.config.check_path_component("x", "..")


def test_suite_defaults_are_read_for_every_suite_without_importing_torch():
    code = ("import sys, epmq.config as c; from epmq.suites import SUITES; "
            "d = {k: c.suite_defaults(k) for k in SUITES}; "
            "assert all(isinstance(v, dict) and 'tasks' in v for v in d.values()), d; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


CLI_CASES = [
    (["--set", "sym=maybe"], "--set sym='maybe': 'maybe' is not of type 'boolean'"),
    (["--set", "lam_w=abc"], "--set lam_w='abc'"),
    (["--set", "lamw=1"], "--set lamw: unknown knob"),
    (["--set", "lam_w"], "--set 'lam_w': expected key=value"),
    (["--group-size", "7"], "--group-size=7: expected one of [-1, 16, 32, 64, 128, 256]"),
    (["--bits", "9"], "--bits=9: expected 2..8"),
]


@pytest.mark.parametrize("extra,message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_cli_override_is_one_line_and_exit_2(tmp_path, extra, message):
    args = ["--suite", "tiny-vit", "--merge", "task_arithmetic", "--method", "epmq", "--bits", "3"]
    if "--bits" in extra:
        args = args[:-2]
    r = subprocess.run([str(Path(sys.executable).parent / "epmq"), "quantize", "--config",
                        str(ROOT / "configs" / "tiny.yaml"), *args, *extra], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _calib_file(path: Path, batches: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {f"{t}/{i:05d}": torch.zeros(2, 3) for t, n in batches.items() for i in range(n)}
    save_file(tensors or {"_": torch.zeros(1)}, str(path),
              metadata={"tasks": json.dumps(list(batches)), "batches": json.dumps(batches)})
    return path


def test_calibration_with_no_batches_for_a_task_names_file_and_task(tmp_path):
    from epmq.pipeline import load_calibration

    path = _calib_file(tmp_path / "n32_s0.safetensors", {"digits": 2, "textures": 0})
    with pytest.raises(EPMQError, match=r"n32_s0.safetensors: task 'textures' has no calibration batches \(0\)"):
        load_calibration(path, ["digits", "textures"])
    assert len(load_calibration(_calib_file(tmp_path / "ok.safetensors", {"digits": 2, "textures": 1}),
                                ["digits", "textures"])[1]) == 1


def test_calibration_that_is_not_one_is_named(tmp_path):
    from epmq.pipeline import load_calibration

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EPMQError, match="junk.safetensors: not a readable safetensors file"):
        load_calibration(tmp_path / "junk.safetensors", ["digits"])


def test_evaluating_nan_weights_is_refused_and_writes_nothing(tmp_path):
    from epmq.identity import Merged
    from epmq.pipeline import _evaluate_encoder

    enc = torch.nn.Linear(4, 2)
    with torch.no_grad():
        enc.weight[0, 1] = float("nan")
    out = tmp_path / "eval.json"
    with pytest.raises(EPMQError, match=r"merged/task_arithmetic: weight weight has NaN/Inf; not evaluated"):
        _evaluate_encoder({}, None, Merged("tiny-vit", "task_arithmetic"), enc, {}, out)
    assert not out.exists()


def test_an_evaluation_record_missing_a_task_is_refused_by_the_report(tmp_path):
    from epmq.report import load_runs

    full = make_run("merged", {"mnist": 80.0, "svhn": 70.0}, merge="task_arithmetic")
    short = make_run("quantized", {"mnist": 79.0}, merge="task_arithmetic", method="gptq", bits=4, seed=1)
    paths = []
    for name, rec in (("merged.json", full), ("s1.json", short)):
        (tmp_path / name).write_text(json.dumps(rec))
        paths.append(tmp_path / name)
    with pytest.raises(EPMQError, match=r"s1.json: no result for task\(s\) \['svhn'\], which other tiny-vit runs have"):
        load_runs(paths, complete=True)
    assert len(load_runs(paths)) == 2  # the library's tolerant reading: "–" and no Avg for that run
    # an expert scored on its own task only is fine
    (tmp_path / "e.json").write_text(json.dumps(make_run("expert", {"mnist": 99.0}, expert_task="mnist")))
    assert len(load_runs([paths[0], tmp_path / "e.json"], complete=True)) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop(next(iter(sd))), r"merged.safetensors: state dict mismatch \(missing \["),
    (lambda sd: sd.update(extra=torch.zeros(1)),
     r"merged.safetensors: state dict mismatch \(missing \[\], unexpected \['extra'\]"),
    (lambda sd: sd.update({k: torch.zeros(3, 3) for k in [next(iter(sd))]}),
     r"merged.safetensors: key '.*' has shape \(3, 3\)"),
])
def test_a_checkpoint_with_wrong_keys_or_shapes_is_named_in_one_line(tmp_path, damage, message):
    """A damaged or foreign weights file read by a suite: one line naming the file and the first bad key."""
    from safetensors.torch import save_file

    from epmq.suites import get_suite

    suite = get_suite("tiny-vit", tmp_path / "cache", width=16, layers=1, heads=2, output_dim=8)
    sd = dict(suite.new_encoder().state_dict())
    damage(sd)
    path = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(EPMQError, match=message):
        suite.load_encoder(path)


def test_more_calibration_examples_than_the_train_split_is_refused(tmp_path):
    """A count larger than the data is an error naming the task and the limit, never silently fewer (the run
    record states the requested count)."""
    from epmq.suites import get_suite

    suite = get_suite("tiny-vit", tmp_path / "cache", tasks=["digits"], width=16, layers=1, heads=2, output_dim=8,
                      max_train=40)
    assert sum(len(b) for b in suite.calibration_batches("digits", 40, seed=0, batch_size=16)) == 40
    with pytest.raises(EPMQError, match=r"calibration_batches\(digits\): n=41: expected 1\.\.40"):
        suite.calibration_batches("digits", 41, seed=0, batch_size=16)
