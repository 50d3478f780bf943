"""The ``t5-glue`` suite (epmq.suites.glue_t5) and its DAG on tiny stand-ins with the real file layouts, fully
offline: a random 2+2-layer FLAN-style ``T5ForConditionalGeneration`` (untied ``lm_head``) with a hand-made
``tokenizers`` WordLevel tokenizer saved by ``save_pretrained`` (the base), perturbed experts saved the same
way, and tiny GLUE datasets saved with ``DatasetDict.save_to_disk`` in the hub's schema (the task's text
columns, ``label`` as ClassLabel with GLUE's names -- STS-B a float --, ``idx``; the hub's split names, MNLI's
``validation_matched`` included). The DAG runs with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` and an
empty ``HF_HOME``, so nothing real is read or downloaded."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import epmq.config  # noqa: E402
from epmq.errors import EPMQError  # noqa: E402
from epmq.suites import DEFAULT_TASKS, get_suite  # noqa: E402
from epmq.suites import glue_t5 as S  # noqa: E402
from epmq.tasks.glue import GLUE_TASKS, format_example, get_glue_task, target_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TASKS = ("mnli", "stsb")  # 3 classes in validation_matched; text-to-text regression scored with Spearman
T5_SMALL = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
            "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
            "tie_word_embeddings": False}  # FLAN-T5: untied head
OPTS = {"tasks": TASKS, "n_val": 4, "calib_pool": 10, "eval_batch_size": 4, "max_new_tokens": 4, "device": "cpu",
        "progress": False}
WORDS = ("the cat dog sat ran on mat a big small red blue tree house river what who is was not very good bad "
         "movie film").split()
#: the hub's columns and ClassLabel names per GLUE config (STS-B: a float similarity)
SCHEMA = {
    "cola": (("sentence",), ("unacceptable", "acceptable")),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "sst2": (("sentence",), ("negative", "positive")),
    "stsb": (("sentence1", "sentence2"), None),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------- stand-ins


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


def _glue_dataset(path: Path, task: str, n_train: int, n_eval: int, seed: int) -> list[str]:
    """A GLUE config in the hub's schema saved with save_to_disk; returns every text a prompt or target holds."""
    cols, names = SCHEMA[task]
    rng = np.random.default_rng(seed)
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=list(names))
    feats = datasets.Features({**{c: datasets.Value("string") for c in cols}, "label": label,
                               "idx": datasets.Value("int32")})

    def split(n, test=False):
        rows = {c: [_sentence(rng) for _ in range(n)] for c in cols}
        if test:  # the hub's test splits: hidden labels
            rows["label"] = [-1.0 if names is None else -1] * n
        elif names is None:
            rows["label"] = [float(np.round(rng.uniform(0, 5), 3)) for _ in range(n)]
        else:
            rows["label"] = [int(x) for x in rng.integers(0, len(names), n)]
        rows["idx"] = list(range(n))
        return datasets.Dataset.from_dict(rows, features=feats)

    evals = ("validation_matched", "validation_mismatched") if task == "mnli" else ("validation",)
    tests = ("test_matched", "test_mismatched") if task == "mnli" else ("test",)
    dd = {"train": split(n_train), **{s: split(n_eval) for s in evals}, **{s: split(3, test=True) for s in tests}}
    datasets.DatasetDict(dd).save_to_disk(str(path))
    texts = []
    for s in ("train", *evals):
        for row in dd[s]:
            texts += [format_example(task, row), target_text(task, row["label"])]
    return texts


def _tokenizer(texts):
    """A WordLevel tokenizer over whitespace-split words (+ T5's specials: <pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for t in texts for w in t.split()} | {f"{x / 10:.1f}" for x in range(51)})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=512)


def _tiny_t5(path: Path, tokenizer, **overrides):
    """A random FLAN-style T5 saved with its own ``lm_head.weight`` (as google/flan-t5-* checkpoints are)."""
    from epmq.models.sources import build_t5

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tokenizer), **{**T5_SMALL, **overrides})
    model = build_t5(cfg.to_dict())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _expert(base, path: Path, seed: int):
    """A perturbed copy of the base (every weight, as full fine-tuning changes them), saved by save_pretrained."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5world")
    texts = []
    for i, t in enumerate(TASKS):
        texts += _glue_dataset(root / f"ds_{t}", t, 18, 7, i)
    tok = _tokenizer(texts)
    base = _tiny_t5(root / "base", tok)
    for i, t in enumerate(TASKS):
        _expert(base, root / f"exp_{t}", 10 + i)
    _tiny_t5(root / "exp_bad", tok, d_ff=48)  # another architecture: shapes differ from the base
    (root / "hf_home").mkdir()
    opts = dict(OPTS, base=str(root / "base"), experts=str(root / "exp_{task}"),
                datasets={t: str(root / f"ds_{t}") for t in TASKS})
    return {"root": root, "base": base, "opts": opts}


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    suite = S.T5GlueSuite(tmp_path_factory.mktemp("cache"), **world["opts"])
    suite.prefetch()
    suite.build_base()
    for t in TASKS:
        suite.build_expert(t)
    return suite


# --------------------------------------------------------------------------------------------- suite


def test_registered_with_the_paper_tasks():
    assert DEFAULT_TASKS["t5-glue"] == tuple(S.DEFAULTS["tasks"]) == GLUE_TASKS
    assert S.DEFAULTS["base"] == "google/flan-t5-base"
    assert S.T5GlueSuite("unused").expert_source("sst2") == "tanganke/flan-t5-base_glue-sst2"


def test_base_and_experts_hold_every_tensor_once_and_reload_exactly(built, world):
    base_sd = built.base_state_dict()
    assert "shared.weight" in base_sd and "lm_head.weight" in base_sd  # FLAN-T5: the head is its own weight
    assert not any(k.endswith("embed_tokens.weight") for k in base_sd)  # tied copies of shared.weight
    model = built.load_encoder(built.base_path)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.lm_head.weight is not model.shared.weight
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "labels": torch.tensor([[8, 1]])}
    with torch.no_grad():
        want = world["base"](input_ids=batch["input_ids"], labels=batch["labels"]).logits
        got = model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    assert torch.equal(got, want)
    for t in TASKS:
        meta = json.loads(built.expert_path(t).with_suffix(".json").read_text())
        assert meta["relative_delta"] > 0 and meta["source"] == str(world["root"] / f"exp_{t}")
        assert set(built.load_encoder(built.expert_path(t)).state_dict()) == set(model.state_dict())
    assert built.head("mnli") is None


def test_splits_are_glue_validation_and_disjoint_train_carves(built):
    for t in TASKS:
        test = built.indices(t, "test").tolist()
        assert test == list(range(7))  # every row of validation(_matched), in order
        val, pool = set(built.indices(t, "validation").tolist()), set(built.indices(t, "train").tolist())
        assert len(val) == 4 and len(pool) == 10 and not val & pool
        meta = json.loads(built.data_path(t, "test").with_suffix(".json").read_text())
        assert meta["key"]["hf_split"] == get_glue_task(t).eval_split
    assert built.labels("stsb", "test").dtype == torch.float32
    assert built.labels("mnli", "test").dtype == torch.int64


def test_calibration_batches_are_teacher_forcing_batches(built):
    tok = built.tokenizer()
    batches = built.calibration_batches("stsb", 6, seed=0, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape == b["attention_mask"].shape and b["labels"].dtype == torch.int64
        for ids, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            real = ids[mask.bool()].tolist()
            assert real[-1] == tok.eos_token_id and (ids[~mask.bool()] == tok.pad_token_id).all()
            target = lab[lab != -100].tolist()
            assert target[-1] == tok.eos_token_id
            assert float(tok.decode(target, skip_special_tokens=True)) in {x / 10 for x in range(51)}
    again = built.calibration_batches("stsb", 6, seed=0, batch_size=4)
    other = built.calibration_batches("stsb", 6, seed=1, batch_size=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert any(a["input_ids"].shape != b["input_ids"].shape or not torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(batches, other))
    with pytest.raises(EPMQError, match="n=11: expected 1..10"):
        built.calibration_batches("stsb", 11, seed=0)


def test_evaluation_scores_generated_text(built, monkeypatch):
    model = built.load_encoder(built.base_path)
    first = built.generate(model, "mnli")
    assert len(first) == 7 and all(isinstance(x, str) for x in first)
    assert built.generate(model, "mnli") == first  # greedy, batched by length: deterministic
    words = get_glue_task("mnli").label_words
    gold = built.labels("mnli", "test").tolist()
    sims = built.labels("stsb", "test").tolist()
    answers = {"mnli": [f" {words[g].upper()} " for g in gold], "stsb": [f"{s:.1f}" for s in sims]}
    monkeypatch.setattr(built, "generate", lambda m, task, split="test": answers[task])
    out = built.evaluate_all(model)
    mnli, stsb = out["tasks"]["mnli"], out["tasks"]["stsb"]
    assert mnli["accuracy"] == 100.0 and mnli["metric"] == "accuracy" and mnli["invalid"] == 0
    assert stsb["metric"] == "spearman" and stsb["accuracy"] == stsb["spearman"] > 99  # rounding to .1 only
    assert stsb["stderr"] >= 0 and stsb["pearson"] > 99 and stsb["unparsed"] == 0
    answers["stsb"] = ["no number"] * 7  # constant predictions: rho undefined, reported as 0
    rec = built.evaluate(model, "stsb")
    assert rec["accuracy"] == 0.0 and rec["constant_predictions"] and rec["unparsed"] == 7


def test_glue_records_for_cola_and_negative_correlations():
    rec = S.glue_record("cola", "test", {"accuracy": 0.5, "n": 4, "invalid": 1, "matthews_corr": -0.25})
    assert rec["accuracy"] == 50.0 and rec["correct"] == 2 and rec["matthews_corr"] == -25.0
    rec = S.glue_record("stsb", "test", {"spearman": -0.5, "pearson": float("nan"), "n": 10, "unparsed": 0})
    assert rec["accuracy"] == -50.0 and rec["pearson"] is None and rec["stderr"] > 0
    from epmq.report.runs import normalize_run

    run = normalize_run({"schema": 1, "suite": "s", "model": "base", "tasks": {"stsb": rec}}, "x.json")
    assert run["tasks"]["stsb"]["accuracy"] == -50.0
    with pytest.raises(EPMQError, match=r"accuracy=-50.0: expected a percentage in \[0, 100\]"):
        normalize_run({"schema": 1, "suite": "s", "model": "base", "tasks": {"t": {"accuracy": -50.0}}}, "x.json")


def test_sequential_decoder_sees_the_quantized_encoder(built, monkeypatch):
    """The decoder's calibration inputs are captured by running the model whose encoder is already quantized
    (and, for the experts, each expert's own encoder): its ``encoder_hidden_states`` are exactly those."""
    import epmq.engine.runner as R
    from epmq.engine import QuantConfig, quantize_model

    seen = []
    real = R.capture_block_inputs

    def spy(model, block, adapter, batches, device, dtype=None, stack=0, *rest, **kw):
        calls = real(model, block, adapter, batches, device, dtype, stack, *rest, **kw)
        if stack == 1:
            seen.append((model, [copy.deepcopy(c.args[3]) for c in calls]))
        return calls

    monkeypatch.setattr(R, "capture_block_inputs", spy)  # where the engine reads it
    merged = built.load_encoder(built.base_path)
    calib = [built.calibration_batches(t, 6, seed=0, batch_size=4) for t in TASKS]
    experts = [built.load_encoder(built.expert_path(t)) for t in TASKS]
    rep = quantize_model(merged, calib, QuantConfig(method="epmq", bits=3), experts=experts, progress=False)
    assert len(rep.results) == 2 * 7 + 2 * 11
    assert len(seen) == 2 * len(TASKS)  # per task: the model being quantized, then per task: its expert
    fp = built.load_encoder(built.base_path)

    def encoded(model, b):
        with torch.no_grad():
            return model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state

    for t in range(len(TASKS)):
        (who, mine), (_, theirs) = seen[t], seen[len(TASKS) + t]
        assert who is merged
        for b, h, he in zip(calib[t], mine, theirs):
            assert torch.allclose(h, encoded(merged, b), atol=1e-6)  # the quantized encoder's output ...
            assert not torch.allclose(h, encoded(fp, b), atol=1e-4)  # ... not the full-precision one's
            assert torch.allclose(he, encoded(experts[t], b), atol=1e-6)  # the expert's own encoder


def test_padding_in_encoder_inputs_never_enters_the_statistics(built):
    """What sits at padded encoder positions changes nothing -- including the cross-attention k/v statistics,
    which select encoder positions while their block's own positions are the decoder's."""
    from epmq.engine import QuantConfig, quantize_model

    calib = [built.calibration_batches(t, 6, seed=0, batch_size=3) for t in TASKS]
    g = torch.Generator().manual_seed(3)
    other = [[{**b, "input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"],
                                             torch.randint(3, 40, b["input_ids"].shape, generator=g))}
              for b in task] for task in calib]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for ta, tb in zip(calib, other) for a, b in zip(ta, tb))
    experts = [built.load_encoder(built.expert_path(t)) for t in TASKS]
    out = []
    for batches in (calib, other):
        model = built.load_encoder(built.base_path)
        out.append(quantize_model(model, batches, QuantConfig(method="epmq", bits=3), experts=experts,
                                  progress=False))
    for k in out[0].results:
        assert (out[0].results[k].codes == out[1].results[k].codes).float().mean() >= 0.999, k
    for a, b in zip(out[0].layers, out[1].layers):
        assert a["rel_err_merged"] == pytest.approx(b["rel_err_merged"], rel=1e-4, abs=1e-9), a["layer"]


# --------------------------------------------------------------------------------------------- errors


def test_offline_prefetch_lists_every_missing_source_at_once(world, tmp_path):
    opts = dict(world["opts"], experts={"mnli": str(world["root"] / "exp_mnli"), "stsb": "someone/not-cached"},
                datasets={"mnli": str(world["root"] / "ds_mnli")})
    with pytest.raises(EPMQError) as e:
        S.T5GlueSuite(tmp_path, **opts).prefetch()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("t5-glue suite: 3 source(s) offline")
    assert "model someone/not-cached" in msg
    assert "dataset nyu-mll/glue:stsb [train] (stsb)" in msg and "dataset nyu-mll/glue:stsb [validation] (stsb)" in msg
    assert "exp_mnli" not in msg and "ds_mnli" not in msg  # only what is missing


def test_expert_of_another_shape_is_refused_naming_the_key(world, tmp_path):
    root = world["root"]
    opts = dict(world["opts"], experts={"mnli": str(root / "exp_bad"), "stsb": str(root / "exp_stsb")})
    suite = S.T5GlueSuite(tmp_path, **opts)
    with pytest.raises(EPMQError, match=r"^expert 'mnli': key '\S+DenseReluDense\.wi_0\.weight' has shape \(48, 32\) "
                                        r"but the base has \(64, 32\)$"):
        suite.build_expert("mnli")
    assert not suite.expert_path("mnli").exists()


def test_bad_options_and_columns_are_named(world, tmp_path):
    with pytest.raises(EPMQError, match="unknown option"):
        S.T5GlueSuite(tmp_path, head="x")
    with pytest.raises(EPMQError, match="task 'SST-2': use the registry's spelling 'sst2'"):
        S.T5GlueSuite(tmp_path, tasks=["SST-2"])
    with pytest.raises(EPMQError, match="max_new_tokens=0"):
        S.T5GlueSuite(tmp_path, max_new_tokens=0)
    stsb = str(world["root"] / "ds_stsb")
    wrong = dict(world["opts"], datasets={"mnli": stsb, "stsb": stsb})
    with pytest.raises(EPMQError, match=r"mnli: local dataset \S+ds_stsb has no split 'validation_matched'"):
        S.T5GlueSuite(tmp_path, **wrong).data_file("mnli", "test")


def test_pinned_revisions_reach_every_download_and_are_recorded(world, tmp_path, monkeypatch):
    """The stand-ins served as the hub would (an HF model cache with refs/main -> snapshots/<commit>; GLUE splits
    under a folder named by their commit, as ``datasets`` caches them): every download asks for its pin, the
    commit read is recorded, the tokenizer reads the base at base.json's commit, another commit is refused."""
    import shutil

    import huggingface_hub

    sha = {k: c * 40 for k, c in (("base", "1"), ("mnli", "2"), ("stsb", "3"), ("glue", "4"), ("other", "5"))}
    hub = tmp_path / "hub"
    for hub_id, folder, key in (("acme/t5", "base", "base"), ("acme/t5_mnli", "exp_mnli", "mnli"),
                                ("acme/t5_stsb", "exp_stsb", "stsb")):
        repo = hub / "models" / ("models--" + hub_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(sha[key])
        shutil.copytree(world["root"] / folder, repo / "snapshots" / sha[key])
    for t in TASKS:
        dd = datasets.load_from_disk(world["opts"]["datasets"][t])
        for split in dd:
            dd[split].save_to_disk(str(hub / "data" / t / split / sha["glue"]))
    calls, real = [], huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw["revision"]))
        return real(repo_id, **{**kw, "cache_dir": str(hub / "models")})

    def load_dataset(path, name=None, *, split, revision=None, **kw):
        calls.append((f"{path}:{name}", revision))
        (cached,) = (hub / "data" / name / split).iterdir()  # the one cached commit, whatever is asked
        return datasets.load_from_disk(str(cached))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pins = {"models": {"acme/t5": sha["base"], "acme/t5_mnli": "main", "acme/t5_stsb": sha["stsb"]},
            "datasets": {"nyu-mll/glue": sha["glue"]}}
    opts = dict(OPTS, base="acme/t5", experts="acme/t5_{task}", revisions=pins)
    with pytest.raises(EPMQError, match=r"^t5-glue suite: revisions.datasets has no revision for \['nyu-mll/glue'\]"):
        S.T5GlueSuite(tmp_path / "c", **dict(opts, revisions={"models": pins["models"]}))
    suite = S.T5GlueSuite(tmp_path / "c", **opts)
    out = suite.prefetch()  # + tokenization of every split, with the base's tokenizer
    assert out["revisions"] == {"models": {"acme/t5": sha["base"], "acme/t5_mnli": sha["mnli"],
                                           "acme/t5_stsb": sha["stsb"]}, "datasets": {"nyu-mll/glue": sha["glue"]}}
    suite.build_base()
    for t in TASKS:
        suite.build_expert(t)
    want = {**pins["models"], **{f"nyu-mll/glue:{t}": sha["glue"] for t in TASKS}}
    assert calls and {c[0] for c in calls} == set(want) and [c for c in calls if c[1] != want[c[0]]] == []
    base = json.loads(suite.base_path.with_suffix(".json").read_text())
    mnli = json.loads(suite.expert_path("mnli").with_suffix(".json").read_text())
    data = json.loads(suite.data_path("stsb", "train").with_suffix(".json").read_text())
    assert (base["revision"], base["revision_pinned"]) == (sha["base"], sha["base"])
    assert (mnli["revision"], mnli["revision_pinned"]) == (sha["mnli"], "main")
    assert (data["hub_dataset"], data["revision"], data["revision_pinned"]) == (
        "nyu-mll/glue", sha["glue"], sha["glue"])
    moved = dict(opts, revisions={"models": {**pins["models"], "acme/t5": sha["other"]}, "datasets": pins["datasets"]})
    with pytest.raises(EPMQError, match=rf"^base 'acme/t5' is pinned to revision {sha['other']} but the cached \S+ "
                                        rf"was built from {sha['base']}"):
        S.T5GlueSuite(tmp_path / "c", **moved).build_base()
    moved = dict(opts, revisions={"models": pins["models"], "datasets": {"nyu-mll/glue": sha["other"]}})
    with pytest.raises(EPMQError, match=rf"^stsb: dataset 'nyu-mll/glue' \(stsb\) split 'train' is pinned to revision "
                                        rf"{sha['other']} but `datasets` loaded {sha['glue']}"):
        S.T5GlueSuite(tmp_path / "fresh", **moved).data_file("stsb", "train")


# --------------------------------------------------------------------------------------------- the DAG


def _config(world: Path) -> dict:
    """configs/paper/flan-t5-base-glue.yaml scaled down to the stand-ins (paths absolute, CPU, 1 thread)."""
    return {
        "results": "results",
        "reports": "reports",
        "threads": 1,
        "device": "cpu",
        "suites": {"t5-tiny": {"type": "t5-glue", "options": {
            **OPTS, "tasks": list(TASKS), "base": str(world / "base"),
            "experts": str(world / "exp_{task}"), "datasets": {t: str(world / f"ds_{t}") for t in TASKS}}}},
        "merges": {"task_arithmetic": {"params": {"lam": 0.3}}},
        "quantize": {"methods": ["rtn", "gptq", "epmq"], "bits": [4], "group_size": [-1]},
        "calibration": {"n_per_task": 8, "seeds": [0], "batch_size": 4},
        "anchors": {"t5-tiny": [{"label": "E-PMQ paper", "source": "arXiv 2605.16882", "model": "quantized",
                                 "merge": "unstated merge", "method": "epmq", "bits": 4, "value": 83.34}]},
    }


def _snakemake(work: Path, world: Path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(world / "hf_home"))
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(k, None)
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    if r.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((work / "logs").rglob("*.log")))
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{logs[-6000:]}")
    return r


def test_dag_runs_offline_to_a_leaderboard(world, tmp_path):
    root = world["root"]
    cfg = _config(root)
    epmq.config.validate(copy.deepcopy(cfg))
    (tmp_path / "t5.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _snakemake(tmp_path, root, "--cores", "2", "--configfile", "t5.yaml")
    res = tmp_path / "results" / "t5-tiny"
    fetched = json.loads((res / "fetched.json").read_text())
    assert fetched["suite_type"] == "t5-glue"
    assert fetched["fetched"]["models"] == [str(root / "base"), *(str(root / f"exp_{t}") for t in TASKS)]
    # the merge includes lm_head (FusionBench merges the whole state dict): it differs from the base's
    from safetensors.torch import load_file

    merged = load_file(str(res / "merged" / "task_arithmetic.safetensors"))
    base = load_file(str(res / "base.safetensors"))
    assert set(merged) == set(base) and not torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    quant = json.loads((res / "quant" / "task_arithmetic" / "epmq" / "w4g-1" / "s0.json").read_text())
    assert len(quant["quantized"]) == 2 * 7 + 2 * 11 and not any("lm_head" in k or "shared" in k
                                                                 for k in quant["quantized"])
    grid = epmq.config.expand(_validated(tmp_path / "t5.yaml"))
    records = {m: json.loads((res / "eval" / f"{m}.json").read_text()) for m in grid.eval_targets("t5-tiny")}
    kinds = sorted((r["model"], r["expert_task"] or "", r["method"] or "") for r in records.values())
    assert kinds == sorted([("base", "", ""), ("expert", "mnli", ""), ("expert", "stsb", ""), ("merged", "", ""),
                            ("quantized", "", "epmq"), ("quantized", "", "gptq"), ("quantized", "", "rtn")])
    rows = [r for r in csv.DictReader((tmp_path / "reports" / "leaderboard.csv").open()) if r["origin"] == "ours"]
    # every model on every task, except that an expert is evaluated on its own task only
    assert len(rows) == sum(1 if r["model"] == "expert" else len(TASKS) for r in records.values())
    assert {(r["task"], r["metric"]) for r in rows} == {("mnli", "accuracy"), ("stsb", "spearman")}
    for r in rows:
        rec = next(x for x in records.values() if (x["model"], x["expert_task"] or "", x["method"] or "")
                   == (r["model"], r["expert_task"], r["method"]))
        assert float(r["value"]) == pytest.approx(rec["tasks"][r["task"]]["accuracy"], abs=1e-3)
        assert int(r["n"]) == 7
    md = (tmp_path / "reports" / "leaderboard.md").read_text()
    assert "## t5-tiny" in md and "t5-tiny stsb: spearman" in md and "83.34" in md
    for name in ("Base", "Experts", "FP merged", "RTN", "GPTQ", "E-PMQ"):
        assert name in md
    hub = root / "hf_home" / "hub"
    assert not hub.exists() or not any(hub.glob("models--*"))


def _validated(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    epmq.config.validate(cfg)
    return cfg


def test_paper_config_describes_the_flan_t5_setting():
    cfg = _validated(ROOT / "configs" / "paper" / "flan-t5-base-glue.yaml")
    grid = epmq.config.expand(cfg)
    (suite,) = grid.suites
    assert grid.suites[suite]["type"] == "t5-glue" and grid.tasks(suite) == list(GLUE_TASKS)
    assert cfg["calibration"]["n_per_task"] == 256 and sorted(cfg["quantize"]["bits"]) == [3, 4]
    assert {m["method"] for m in grid.merges.values()} == {"task_arithmetic", "ties"}
    assert sorted(a["value"] for a in cfg["anchors"][suite]) == [78.26, 83.34]  # METHOD.md section 1
    s = get_suite("t5-glue", "unused", **cfg["suites"][suite]["options"])
    assert s.model_sources()[0] == "google/flan-t5-base" and len(s.model_sources()) == 9
