"""The tiny-vit suite on a tiny configuration: build, cache round trip, metadata, frozen heads, evaluation
records, determinism and the adapter."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from epmq.errors import EPMQError
from epmq.suites import get_suite
from epmq.suites._splits import SPLITS
from epmq.suites.tiny_vit import TinyViTSuite

TINY = dict(tasks=("digits", "textures"), width=32, layers=2, heads=2, output_dim=16, batch_size=32,
            pretrain_steps=6, expert_steps=6, max_train=180, max_eval=120, threads=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny_vit")
    suite = get_suite("tiny-vit", cache, seed=0, **TINY)
    paths = suite.build_all()
    return suite, paths


def test_registry_and_files(built):
    suite, paths = built
    assert isinstance(suite, TinyViTSuite) and suite.tasks == ("digits", "textures")
    assert paths["base"].is_file() and paths["base"].suffix == ".safetensors"
    for t in suite.tasks:
        assert paths["experts"][t].is_file() and paths["heads"][t].is_file()
    # safetensors, not pickle: the header is 8-byte length + JSON
    raw = paths["base"].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8: 8 + n])


def test_adapter_recognises_encoder(built):
    from epmq.models.adapters import get_adapter

    suite, _ = built
    enc = suite.base_encoder()
    assert get_adapter(enc).name == "openclip_vit" == suite.adapter
    names = {k for k, _ in enc.named_parameters()}
    assert "transformer.resblocks.0.attn.in_proj_weight" in names
    assert "transformer.resblocks.1.mlp.c_fc.weight" in names and "transformer.resblocks.1.mlp.c_proj.weight" in names


def test_cache_reloads_to_identical_outputs(built):
    suite, paths = built
    mtimes = {p: p.stat().st_mtime_ns for p in [paths["base"], *paths["experts"].values(), *paths["heads"].values()]}
    again = TinyViTSuite(suite.cache_dir, seed=0, **TINY)
    again.build_all()  # everything cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    x = suite.calibration_batches("digits", 16, seed=3, batch_size=16)[0]
    for a, b in [(suite.base_encoder(), again.base_encoder()),
                 (suite.expert_encoder("digits"), again.expert_encoder("digits"))]:
        assert torch.equal(a(x), b(x))
    for t in suite.tasks:
        assert torch.equal(suite.head(t).weight, again.head(t).weight)
        # the reloaded expert reproduces the validation accuracy measured right after fine-tuning
        meta = json.loads(paths["experts"][t].with_suffix(".json").read_text())
        assert again.evaluate(again.expert_encoder(t), t, split="validation")["accuracy"] == meta["val_accuracy"]


def test_expert_metadata(built):
    suite, paths = built
    meta = json.loads(paths["experts"]["textures"].with_suffix(".json").read_text())
    for key in ("seed", "steps", "lr", "data_sizes", "train_loss", "val_accuracy", "seconds", "config"):
        assert key in meta, key
    assert meta["seed"] == 0 and meta["steps"] == TINY["expert_steps"] and meta["task"] == "textures"
    assert set(meta["data_sizes"]) == {"train", "validation", "test"}
    assert math.isfinite(meta["train_loss"]) and 0 <= meta["val_accuracy"] <= 100 and meta["seconds"] > 0
    base_meta = json.loads(paths["base"].with_suffix(".json").read_text())
    assert base_meta["data_splits"].startswith("train") and base_meta["steps"] == TINY["pretrain_steps"]


def test_heads_frozen_prototypes(built):
    suite, _ = built
    base = suite.base_encoder()
    for t in suite.tasks:
        h = suite.head(t)
        assert list(h.parameters()) == []  # buffers only: nothing to train, merge or quantize
        assert not h.weight.requires_grad
        assert torch.allclose(h.weight.norm(dim=-1), torch.ones(suite.n_classes(t)), atol=1e-5)
        # still the base's class prototypes after the experts were fine-tuned
        x, y = suite.split(t, "train")
        with torch.no_grad():
            z = torch.nn.functional.normalize(base(x), dim=-1)
        c = int(y[0])
        proto = torch.nn.functional.normalize(z[y == c].mean(0), dim=-1)
        assert torch.allclose(h.weight[c], proto, atol=1e-5)
        with torch.no_grad():
            logits = h(base(x[:4]))
        assert logits.shape == (4, suite.n_classes(t)) and float(logits.abs().max()) <= h.logit_scale + 1e-3


def test_evaluate_record(built):
    suite, _ = built
    rec = suite.evaluate(suite.expert_encoder("digits"), "digits")
    assert set(rec) >= {"task", "split", "n", "correct", "accuracy", "stderr"}
    assert rec["task"] == "digits" and rec["split"] == "test" and rec["n"] == len(suite.split("digits", "test")[1])
    p = rec["correct"] / rec["n"]
    assert rec["accuracy"] == pytest.approx(100 * p)
    assert rec["stderr"] == pytest.approx(100 * math.sqrt(p * (1 - p) / rec["n"]))
    assert suite.evaluate(suite.expert_encoder("digits"), "digits") == rec


def test_calibration_batches(built):
    suite, _ = built
    a = suite.calibration_batches("textures", 40, seed=1, batch_size=16)
    b = suite.calibration_batches("textures", 40, seed=1, batch_size=16)
    assert [tuple(t.shape) for t in a] == [(16, 3, 28, 28), (16, 3, 28, 28), (8, 3, 28, 28)]
    assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[0][:, 0], a[0][:, 2])  # grayscale replicated
    assert suite.base_encoder()(a[0]).shape == (16, TINY["output_dim"])


def test_same_seed_same_accuracy(built, tmp_path):
    suite, _ = built
    other = TinyViTSuite(tmp_path, seed=0, **TINY)
    other.build_base()
    other.build_expert("textures")
    assert torch.equal(other.base_encoder().proj, suite.base_encoder().proj)
    assert (other.evaluate(other.expert_encoder("textures"), "textures")
            == suite.evaluate(suite.expert_encoder("textures"), "textures"))


def test_errors(built, tmp_path):
    suite, _ = built
    with pytest.raises(EPMQError, match="unknown option"):
        TinyViTSuite(tmp_path, bogus=1)
    with pytest.raises(EPMQError, match="cifar"):
        TinyViTSuite(tmp_path, tasks=("cifar",))
    with pytest.raises(EPMQError, match="init="):
        TinyViTSuite(tmp_path, init="xavier")
    with pytest.raises(EPMQError, match="init_df"):
        TinyViTSuite(tmp_path, init_df=2)
    with pytest.raises(EPMQError, match="'mnist'"):
        suite.head("mnist")
    with pytest.raises(EPMQError, match="other suite options"):
        TinyViTSuite(suite.cache_dir, seed=0, **{**TINY, "pretrain_steps": 7}).build_base()
    other = TinyViTSuite(suite.cache_dir, seed=0, **{**TINY, "expert_steps": 7})
    assert other.build_base() == suite.base_path  # the base does not depend on expert options
    with pytest.raises(EPMQError, match="other suite options"):
        other.build_expert("digits")


def test_layout_build_base_heads_and_evaluate_all(built, tmp_path):
    suite, paths = built
    cache = suite.cache_dir
    assert paths["base"] == suite.base_path == cache / "base.safetensors"
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == sorted(
        ["base.safetensors", "base.json", "splits.safetensors"]
        + [f"{d}/{t}.{e}" for d in ("heads", "experts") for t in suite.tasks for e in ("safetensors", "json")])
    other = TinyViTSuite(tmp_path, seed=0, **TINY)
    assert other.build_base() == tmp_path / "base.safetensors"
    assert all(other.head_path(t).is_file() for t in other.tasks)  # build_base builds every head
    assert not (tmp_path / "experts").exists()
    from safetensors.torch import load_file

    sd = load_file(str(suite.expert_path("digits")))
    a, b = suite.load_encoder(sd), suite.load_encoder(suite.expert_path("digits"))
    x = suite.calibration_batches("digits", 8, seed=0)[0]
    assert torch.equal(a(x), b(x))
    r = suite.evaluate_all(a, split="validation")
    assert set(r) == {"tasks", "mean"} and r["mean"] == pytest.approx(
        sum(v["accuracy"] for v in r["tasks"].values()) / len(r["tasks"]))


def test_evaluate_toy_classifier_gives_the_exact_accuracy(built):
    """A known classifier: images brighter than the split's median get class 1's prototype, the rest class
    0's. The record must count exactly the examples this rule gets right (across the batch boundaries)."""
    suite, _ = built
    x, y = suite.split("digits", "test")
    protos = suite.head("digits").weight
    cut = x.flatten(1).mean(1).median()

    class Toy(torch.nn.Module):
        def forward(self, images):
            return protos[(images.flatten(1).mean(1) > cut).long()]

    expected = int(((x.flatten(1).mean(1) > cut).long() == y).sum())
    assert 0 < expected < len(y)
    for bs in (7, len(y)):  # a last partial batch, and one batch
        rec = TinyViTSuite(suite.cache_dir, seed=0, **{**TINY, "eval_batch_size": bs}).evaluate(Toy(), "digits")
        assert rec["correct"] == expected and rec["n"] == len(y)
        assert rec["accuracy"] == 100.0 * (expected / len(y))


# ------------------------------------------------------------------------------------------- split cache


def _assert_same_splits(a, b):
    for t in a.tasks:
        assert a.n_classes(t) == b.n_classes(t)
        for s in SPLITS:
            (xa, ya), (xb, yb) = a.split(t, s), b.split(t, s)
            assert xa.dtype == xb.dtype == torch.float32 and ya.dtype == yb.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb), (t, s)


def _no_datasets(monkeypatch):
    import epmq.data

    def refuse(*a, **k):
        raise AssertionError("load_dataset called although the split cache is valid")

    monkeypatch.setattr(epmq.data, "load_dataset", refuse)


def test_split_cache_bit_identical_without_datasets(built, tmp_path, monkeypatch):
    suite, _ = built
    path = suite.cache_dir / "splits.safetensors"
    assert suite.splits_path == path and path.is_file() and suite.splits().valid()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = json.loads(f.metadata()["epmq_splits"])
        assert key["suite"] == "tiny-vit" and key["tasks"] == list(TINY["tasks"]) and key["max_eval"] == 120
        x = f.get_tensor("digits/test/x")
        assert x.dtype == torch.uint8 and tuple(x.shape) == (120, 28, 28)
        assert int(f.get_tensor("textures/n_classes")) == 3
    reference = TinyViTSuite(tmp_path, seed=0, **TINY)  # no cache there: the data sets
    assert not reference.splits().valid()
    _assert_same_splits(reference, reference)  # loads every split now, before load_dataset is refused
    _no_datasets(monkeypatch)
    fresh = TinyViTSuite(suite.cache_dir, seed=0, **TINY)
    _assert_same_splits(fresh, reference)
    # a new process evaluating from the cache never imports `datasets`
    code = ("import json, sys; from epmq.suites.tiny_vit import TinyViTSuite; "
            f"s = TinyViTSuite({str(suite.cache_dir)!r}, seed=0, **json.loads({json.dumps(json.dumps(TINY))})); "
            "n = sum(len(s.split(t, p)[1]) for t in s.tasks for p in ('train', 'validation', 'test')); "
            "print(json.dumps([n, 'datasets' in sys.modules, 'pyarrow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n = sum(len(reference.split(t, p)[1]) for t in reference.tasks for p in SPLITS)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [n, False, False]
    assert "warning" not in out.stderr


def test_split_cache_ignored_with_other_data_options(built, capsys):
    suite, _ = built
    mtime = suite.splits_path.stat().st_mtime_ns
    other = TinyViTSuite(suite.cache_dir, seed=0, **{**TINY, "max_eval": 50})
    assert not other.splits().valid()
    x, y = other.split("digits", "test")
    assert tuple(x.shape) == (50, 3, 28, 28) and len(y) == 50
    assert torch.equal(x, suite.split("digits", "test")[0][:50])  # the same shuffled prefix
    assert not TinyViTSuite(suite.cache_dir, seed=1, **TINY).splits().valid()
    assert "warning" not in capsys.readouterr().err
    assert suite.splits_path.stat().st_mtime_ns == mtime  # only build_base writes it


def test_split_cache_corrupt_falls_back_with_warning(built, tmp_path, capsys):
    suite, _ = built
    cache = tmp_path / "cache"
    shutil.copytree(suite.cache_dir, cache)
    path = cache / "splits.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    other = TinyViTSuite(cache, seed=0, **TINY)
    _assert_same_splits(other, suite)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(path) in err and "split cache" in err
    other.build_base()  # base and heads cached: only the split cache is rewritten
    assert TinyViTSuite(cache, seed=0, **TINY).splits().valid()
    _assert_same_splits(TinyViTSuite(cache, seed=0, **TINY), suite)
    assert "warning" not in capsys.readouterr().err
