"""Task definitions (epmq.tasks): the CLIP task registry, GLUE text-to-text formatting and scoring, zero-shot
heads and their cache. Everything is offline and CPU-light; the transformers test uses a 2-layer random CLIP."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from epmq.errors import EPMQError
from epmq.tasks import clip as C
from epmq.tasks import glue as G
from epmq.tasks import heads as H

# --- CLIP task registry ------------------------------------------------------------------------------------


def test_task_lists_sizes_order_and_nesting():
    assert (len(C.TASKS_8), len(C.TASKS_14), len(C.TASKS_20)) == (8, 14, 20)
    assert C.TASKS_8 == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    assert C.TASKS_14[:8] == C.TASKS_8 and C.TASKS_20[:14] == C.TASKS_14
    assert set(C.TASKS_8) < set(C.TASKS_14) < set(C.TASKS_20)
    assert len(set(C.TASKS_20)) == 20
    assert C.TASKS_20[14:] == ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
    assert [C.task_list(n) for n in (8, 14, 20)] == [C.TASKS_8, C.TASKS_14, C.TASKS_20]
    with pytest.raises(EPMQError, match="task_list"):
        C.task_list(10)


@pytest.mark.parametrize("name", C.TASKS_20)
def test_every_task_is_well_formed(name):
    t = C.get_task(name)
    assert t.name == name and isinstance(t, C.ClipTask)
    assert t.n_classes >= 2 and len(set(t.classnames)) == t.n_classes
    assert all(isinstance(c, str) and c and c == c.strip() for c in t.classnames)
    assert t.templates and all(tpl.count("{}") == 1 for tpl in t.templates)
    assert t.hf_dataset.count("/") == 1 and t.train_split and t.test_split
    assert t.image_column and t.label_column
    assert t.prompts(t.classnames[0])[0] == t.templates[0].format(t.classnames[0])


def test_famous_class_counts():
    expected = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "gtsrb": 43, "dtd": 47, "oxford_flowers102": 102,
                "oxford-iiit-pet": 37, "cifar100": 100, "food101": 101, "eurosat": 10, "cifar10": 10, "mnist": 10,
                "svhn": 10, "stl10": 10, "fashion_mnist": 10, "kmnist": 10, "emnist_letters": 26, "fer2013": 7,
                "pcam": 2, "rendered-sst2": 2}
    assert {n: C.get_task(n).n_classes for n in C.TASKS_20} == expected


def test_spot_checks_of_names_templates_and_hub_fields():
    sun, cars, gtsrb = C.get_task("sun397"), C.get_task("stanford-cars"), C.get_task("gtsrb")
    assert sun.classnames[:2] == ("abbey", "airplane cabin") and sun.classnames[-1] == "youth hostel"
    # label order of the dataset = sorted folder names: jail_cell before jail_indoor
    assert sun.classnames.index("jail cell") + 1 == sun.classnames.index("jail indoor")
    assert cars.classnames[0] == "AM General Hummer SUV 2000" and cars.classnames[-1] == "smart fortwo Convertible 2012"
    assert gtsrb.classnames[14] == "stop"
    assert C.get_task("mnist").classnames == tuple("0123456789") == C.get_task("svhn").classnames
    assert C.get_task("mnist").templates == ('a photo of the number: "{}".',)
    assert C.get_task("eurosat").templates[0] == "a centered satellite photo of {}."
    assert C.get_task("dtd").classnames[:3] == ("banded", "blotchy", "braided")
    assert len(C.get_task("cifar10").templates) == 18 and len(C.get_task("resisc45").templates) == 18
    assert C.get_task("cifar100").classnames[26] == "cra"  # FusionBench's head has it so: kept (see below)
    svhn, c100, food = C.get_task("svhn"), C.get_task("cifar100"), C.get_task("food101")
    assert (svhn.hf_dataset, svhn.hf_config) == ("ufldl-stanford/svhn", "cropped_digits")
    assert C.get_task("mnist").hf_dataset == "ylecun/mnist" and C.get_task("dtd").hf_config is None
    assert (c100.hf_dataset, c100.image_column, c100.label_column) == ("tanganke/cifar100", "image", "label")
    assert C.get_task("cifar10").hf_dataset == "tanganke/cifar10"
    assert (food.hf_dataset, food.test_split) == ("ethz/food101", "validation")


# FusionBench's own lists, read as data from the installed ``fusion-bench`` package (``make setup`` installs it
# --no-deps: importing it would need lightning, hydra, ...); its modules are parsed, never imported.
FUSION_BENCH = "fusion_bench"
# hub repositories that moved since FusionBench's configs were written: its id -> the hub's current one
FB_RENAMED = {"mnist": "ylecun/mnist", "svhn": "ufldl-stanford/svhn"}


def _fusion_bench_root():
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.find_spec(FUSION_BENCH)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        msg = "fusion-bench is not installed (make setup installs it: pip install --no-deps fusion-bench==<pin>)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(list(spec.submodule_search_locations)[0])


def _fstring_template(lam):
    """``lambda c: f"a photo of a {c}."`` -> ``"a photo of a {}."`` (anything else is refused)."""
    import ast

    arg = lam.args.args[0].arg
    if not isinstance(lam.body, ast.JoinedStr):
        raise AssertionError(f"template {ast.unparse(lam)!r} is not an f-string lambda")
    out = ""
    for part in lam.body.values:
        if isinstance(part, ast.Constant):
            out += part.value.replace("{", "{{").replace("}", "}}")
        elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id == arg
              and part.conversion == -1 and part.format_spec is None):
            out += "{}"
        else:
            raise AssertionError(f"template {ast.unparse(lam)!r}: unsupported part")
    return out


def _fb_module_values(path) -> dict:
    """The top-level assignments of a FusionBench class-name module, evaluated from its syntax tree: literals,
    lists of f-string lambdas (templates, as format strings) and ``[mapping[str(i)] for i in range(n)]``."""
    import ast

    env = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, v = node.targets[0].id, node.value
        if isinstance(v, ast.List) and v.elts and all(isinstance(e, ast.Lambda) for e in v.elts):
            env[name] = [_fstring_template(e) for e in v.elts]
        elif isinstance(v, ast.ListComp):
            elt, (gen,) = v.elt, v.generators
            ok = (isinstance(elt, ast.Subscript) and isinstance(elt.value, ast.Name) and elt.value.id in env
                  and isinstance(gen.iter, ast.Call) and ast.unparse(gen.iter.func) == "range"
                  and ast.unparse(elt.slice) == f"str({ast.unparse(gen.target)})")
            if ok:
                env[name] = [env[elt.value.id][str(i)] for i in range(ast.literal_eval(gen.iter.args[0]))]
        else:
            try:
                env[name] = ast.literal_eval(v)
            except ValueError:
                pass  # computed values (imagenet's) are not needed
    return env


def _fusion_bench_heads() -> dict:
    """FusionBench's (class names, templates) per task name it registers, for the tasks we define."""
    import ast

    pkg = _fusion_bench_root() / "tasks" / "clip_classification"
    mapping = None
    for node in ast.walk(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_dataset_mapping" for t in node.targets):
            mapping = ast.literal_eval(node.value)
    assert mapping, f"no _dataset_mapping in {pkg / '__init__.py'}: FusionBench's layout changed"
    out = {}
    for name in C.TASKS_20:
        info = mapping[name]  # every task of ours is one of FusionBench's (KeyError otherwise)
        if isinstance(info, str):
            info = {"module": info, "classnames": "classnames", "templates": "templates"}
        env = _fb_module_values(pkg / (info["module"].lstrip(".") + ".py"))
        out[name] = (env[info["classnames"]], env[info["templates"]])
    return out


def test_class_names_and_templates_are_fusion_benchs_exactly():
    """A head must be the one the expert was trained with: every task's class names (order and spelling,
    quirks included) and prompt templates equal those of the installed fusion-bench."""
    fb = _fusion_bench_heads()
    for lst in (C.TASKS_8, C.TASKS_14, C.TASKS_20):
        assert set(lst) <= set(fb)
    for name in C.TASKS_20:
        names, templates = fb[name]
        ours = C.get_task(name)
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(ours.classnames, names)) if a != b]
        assert len(ours.classnames) == len(names) and not diff, (name, len(ours.classnames), len(names), diff[:5])
        assert list(ours.templates) == templates, name
    assert fb["cifar100"][0][26] == "cra"  # the known quirk: kept, as the CIFAR-100 experts' heads have it


def test_dataset_ids_and_splits_are_fusion_benchs():
    import ast

    import yaml

    cfg = _fusion_bench_root().parent / "fusion_bench_config" / "dataset" / "image_classification"
    fer_loader = ast.parse((_fusion_bench_root() / "dataset" / "fer2013.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in fer_loader.body if isinstance(n, ast.FunctionDef) and n.name == "load_fer2013"]
    names = [a.arg for a in fn.args.args]
    fer_path = ast.literal_eval(fn.args.defaults[names.index("path") - (len(names) - len(fn.args.defaults))])
    readme = (cfg / "README.md").read_text(encoding="utf-8")
    assert "'image' and 'label' columns" in readme  # what FusionBench's loader (and ours) reads
    for name in C.TASKS_20:
        t = C.get_task(name)
        for folder, ours in (("train", t.train_split), ("test", t.test_split)):
            entry = yaml.safe_load((cfg / folder / f"{name}.yaml").read_text(encoding="utf-8"))[name]
            if "_args_" in entry:  # load_dataset(path, config)
                path, config = entry["_args_"]
            else:
                path, config = entry.get("path", fer_path if name == "fer2013" else None), entry.get("name")
            assert (FB_RENAMED.get(path, path), config, entry["split"]) == (t.hf_dataset, t.hf_config, ours), name
        if name != "fer2013":  # its loader renames jpg/cls to image/label; we read jpg/cls directly
            assert (t.image_column, t.label_column) == ("image", "label"), name


def test_get_task_names_and_errors():
    assert C.get_task("Stanford_Cars").name == "stanford-cars"
    assert C.get_task("oxford-flowers102").name == "oxford_flowers102"
    assert C.get_task("sun397") is C.get_task("SUN397")
    with pytest.raises(EPMQError, match="'imagenet'.*sun397"):
        C.get_task("imagenet")
    with pytest.raises(EPMQError, match="unknown CLIP task"):
        C.get_task(None)


def test_clip_task_validates_its_fields():
    kw = {"name": "toy", "hf_dataset": "me/toy", "train_split": "train", "test_split": "test",
          "image_column": "image", "label_column": "label"}
    with pytest.raises(EPMQError, match="toy.*exactly one"):
        C.ClipTask(**kw, classnames=("a", "b"), templates=("no placeholder",))
    with pytest.raises(EPMQError, match="toy.*duplicate"):
        C.ClipTask(**kw, classnames=("a", "a"), templates=("{}",))
    with pytest.raises(EPMQError, match="toy.*at least 2"):
        C.ClipTask(**kw, classnames=("a",), templates=("{}",))
    t = C.ClipTask(**kw, classnames=["a", "b"], templates=["x {}"])
    assert t.classnames == ("a", "b") and t.templates == ("x {}",) and t.hf_config is None


def test_import_is_cheap():
    code = "import sys, epmq.tasks; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- GLUE --------------------------------------------------------------------------------------------------


def test_glue_tasks_splits_and_label_words():
    assert G.GLUE_TASKS == ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
    assert G.get_glue_task("mnli").eval_split == "validation_matched"
    assert {G.get_glue_task(t).eval_split for t in G.GLUE_TASKS if t != "mnli"} == {"validation"}
    assert G.get_glue_task("sst2").hf_dataset == "nyu-mll/glue" and G.get_glue_task("sst2").hf_config == "sst2"
    assert G.label_words("cola") == ("unacceptable", "acceptable")
    assert G.label_words("mnli") == ("entailment", "neutral", "contradiction")
    assert G.label_words("qnli") == G.label_words("rte") == ("yes", "no")  # 0 = entailment
    assert G.label_words("mrpc") == G.label_words("qqp") == ("no", "yes")
    assert G.label_words("SST-2") == ("negative", "positive")
    with pytest.raises(EPMQError, match="stsb.*regression"):
        G.label_words("stsb")
    with pytest.raises(EPMQError, match="'wnli'"):
        G.get_glue_task("wnli")
    assert G.target_text("rte", 1) == "no" and G.target_text("stsb", 3.8) == "3.8"
    assert G.target_text("stsb", 4) == "4.0"


def test_glue_format_example():
    row = {"sentence": "a gripping, funny film", "label": 1, "idx": 7}
    assert G.format_example("sst2", row) == (
        "Given the sentence 'a gripping, funny film', determine the sentiment. Is it positive or negative?")
    pair = {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 0}
    text = G.format_example("mnli", pair)
    assert text.startswith("Does the premise: 'A man sleeps.' logically imply")
    assert "hypothesis: 'A person rests.'?" in text
    for t in G.GLUE_TASKS:  # every template reads only its own columns
        fields = G.get_glue_task(t).fields
        assert fields and "{" not in G.format_example(t, dict.fromkeys(fields, "X"))
    assert G.get_glue_task("qnli").fields == ("sentence", "question")
    with pytest.raises(EPMQError, match="rte.*sentence2"):
        G.format_example("rte", {"sentence1": "x"})


def test_glue_score_accuracy_and_matthews():
    # gold [1,1,1,0,0,1] vs predicted [1,1,0,0,1,1]: TP=3 FN=1 TN=1 FP=1 -> MCC = (3-1)/sqrt(4*4*2*2) = 0.25
    preds = ["acceptable", " Acceptable ", "unacceptable", "unacceptable", "acceptable", "ACCEPTABLE\n"]
    out = G.score("cola", preds, [1, 1, 1, 0, 0, 1])
    assert out == {"accuracy": 4 / 6, "n": 6, "invalid": 0, "matthews_corr": 0.25}
    # an answer that is no label word is wrong; for MCC it counts as the other class
    out = G.score("cola", ["maybe", "unacceptable"], [1, 0])
    assert out == {"accuracy": 0.5, "n": 2, "invalid": 1, "matthews_corr": 0.0}
    out = G.score("mnli", ["neutral", "entailment", "contradiction", "yes"], ["neutral", 0, 1, 2])
    assert out == {"accuracy": 0.5, "n": 4, "invalid": 1}
    with pytest.raises(EPMQError, match="2 predictions but 3"):
        G.score("sst2", ["positive", "negative"], [1, 0, 1])
    with pytest.raises(EPMQError, match="-1"):
        G.score("sst2", ["positive"], [-1])
    with pytest.raises(EPMQError, match="prediction 0"):
        G.score("sst2", [1], [1])


def test_parse_stsb():
    assert G.parse_stsb("3.8") == 3.8 and G.parse_stsb(" 4 ") == 4.0 and G.parse_stsb("score: 2.5!") == 2.5
    assert G.parse_stsb(".5") == 0.5
    assert G.parse_stsb("abc") is None and G.parse_stsb("") is None and G.parse_stsb(None) is None


def test_glue_score_stsb_correlations():
    gold = [0.0, 1.0, 2.0, 3.0, 4.0]
    out = G.score("stsb", ["1.0", "3.0", "5.0", "7.0", "9.0"], gold)  # perfectly linear
    assert out["pearson"] == pytest.approx(1.0, abs=1e-12) and out["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert (out["n"], out["unparsed"]) == (5, 0)
    out = G.score("stsb", ["5", "4", "3", "2", "1"], gold)
    assert out["pearson"] == pytest.approx(-1.0) and out["spearman"] == pytest.approx(-1.0)
    # y = x^2: monotone (Spearman 1), Pearson = 40 / sqrt(10 * 174) by hand
    out = G.score("stsb", ["0", "1", "4", "9", "16"], gold)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] == pytest.approx(40 / math.sqrt(1740))
    # an unreadable answer counts as 0.0: preds [0,1,2,3,4] -> perfect again, one unparsed
    out = G.score("stsb", ["no idea", "1", "2", "3", "4"], ["0.0", "1.0", "2.0", "3.0", "4.0"])
    assert out["unparsed"] == 1 and out["pearson"] == pytest.approx(1.0)
    with pytest.raises(EPMQError, match="stsb.*7"):
        G.score("stsb", ["1", "2"], [1.0, 7.0])


def test_spearman_ties_and_against_scipy():
    # ranks of [1,2,2,3] = [1,2.5,2.5,4]; against [1,2,3,4] Pearson of ranks = 4.5/sqrt(4.5*5) = sqrt(0.9)
    assert G.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert math.isnan(G.pearson([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=g).double().numpy()
    y = (torch.randn(40, generator=g).double().numpy() + x).round(1)
    assert G.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert G.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


# --- zero-shot heads ---------------------------------------------------------------------------------------

TOY = C.ClipTask(name="toy", hf_dataset="me/toy", train_split="train", test_split="test", image_column="image",
                 label_column="label", classnames=("cat", "dog"), templates=("a {}.", "the {}."))
TOY_EMB = {"a cat.": [3.0, 4.0], "the cat.": [0.0, 2.0], "a dog.": [1.0, 0.0], "the dog.": [0.0, -5.0]}


def _toy_encoder():
    calls = []

    def tokenize(texts):
        return list(texts)

    def encode_text(prompts):
        calls.append(list(prompts))
        return torch.tensor([TOY_EMB[p] for p in prompts])

    return encode_text, tokenize, calls


def test_zeroshot_head_toy_exact():
    enc, tok, calls = _toy_encoder()
    head = H.zeroshot_head(enc, tok, TOY, logit_scale=1.0, batch_size=3)
    # cat: mean([.6,.8], [0,1]) = [.3,.9] -> /sqrt(.9); dog: mean([1,0], [0,-1]) = [.5,-.5] -> /sqrt(.5)
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [1 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert head.dtype == torch.float32 and head.shape == (2, 2)
    torch.testing.assert_close(head, expected)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(2))
    assert calls == [["a cat.", "the cat.", "a dog."], ["the dog."]]  # chunked by batch_size, in class order
    scaled = H.zeroshot_head(enc, tok, TOY, logit_scale=100.0)
    torch.testing.assert_close(scaled, 100.0 * expected)


def test_zeroshot_head_checks_inputs():
    enc, tok, _ = _toy_encoder()
    with pytest.raises(EPMQError, match="toy.*logit_scale"):
        H.zeroshot_head(enc, tok, TOY, logit_scale=0.0)
    with pytest.raises(EPMQError, match="toy.*encode_text returned"):
        H.zeroshot_head(lambda p: torch.zeros(len(p)), tok, TOY, logit_scale=1.0)
    with pytest.raises(EPMQError, match="toy.*all-zero"):
        H.zeroshot_head(lambda p: torch.zeros(len(p), 3), tok, TOY, logit_scale=1.0)


def test_cached_head_reuses_and_rebuilds(tmp_path):
    path = tmp_path / "heads" / "toy.safetensors"
    n_built = []

    def build():
        n_built.append(1)
        return torch.full((2, 3), float(len(n_built)))

    meta = H.head_meta("base/clip", TOY)
    h1 = H.cached_head(path, build, meta)
    assert len(n_built) == 1 and path.exists()
    assert json.loads(path.with_suffix(".json").read_text()) == meta
    h2 = H.cached_head(path, build, dict(meta))
    assert len(n_built) == 1 and torch.equal(h1, h2)  # reused
    H.cached_head(path, build, {**meta, "base_model": "other/clip"})
    assert len(n_built) == 2  # base model changed
    other = C.ClipTask(**{**TOY.__dict__, "templates": ("a photo of {}.",)})
    assert H.head_meta("base/clip", other)["prompts_sha256"] != meta["prompts_sha256"]
    h4 = H.cached_head(path, build, H.head_meta("base/clip", other))
    assert len(n_built) == 3 and torch.equal(h4, torch.full((2, 3), 3.0))
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        H.cached_head(path, build, H.head_meta("base/clip", other))
    assert len(n_built) == 4  # unreadable cache is rebuilt
    with pytest.raises(EPMQError, match="safetensors"):
        H.cached_head(tmp_path / "head.pt", build, meta)
    with pytest.raises(EPMQError, match="2-D"):
        H.cached_head(tmp_path / "bad.safetensors", lambda: torch.ones(3), meta)


def _tiny_clip_dir(path):
    """A random 2-layer CLIPModel (hidden 32) and a hand-made CLIP BPE tokenizer, saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    chars = [chr(i) for i in range(33, 127)]  # printable ASCII: byte-level BPE maps these to themselves
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("at</w>", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\na t</w>\nc at</w>\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                            "model_max_length": 77}))
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    eot = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=77, eos_token_id=eot,
                         pad_token_id=eot, bos_token_id=vocab["<|startoftext|>"]),
        vision_config=dict(small, image_size=30, patch_size=15), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(path)
    return model


def test_hf_clip_text_encoder_on_tiny_random_clip(tmp_path):
    model = _tiny_clip_dir(tmp_path / "clip")
    encode_text, tokenize = H.hf_clip_text_encoder(tmp_path / "clip")
    batch = tokenize(["a cat.", "a photo of a cat!"])
    assert batch["input_ids"].shape[0] == 2
    assert batch["input_ids"][0, 2].item() == json.loads((tmp_path / "clip" / "vocab.json").read_text())["cat</w>"]
    feats = encode_text(batch)
    assert feats.shape == (2, 16)
    with torch.no_grad():
        ref = model.text_projection(model.text_model(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).pooler_output)
    torch.testing.assert_close(feats, ref)
    # an in-memory model with an explicit tokenizer gives the same features; without one it cannot guess
    from transformers import AutoTokenizer

    enc2, tok2 = H.hf_clip_text_encoder(model, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "clip"))
    torch.testing.assert_close(enc2(tok2(["a cat.", "a photo of a cat!"])), feats)
    with pytest.raises(EPMQError, match="tokenizer="):
        H.hf_clip_text_encoder(model)
    toy = C.ClipTask(**{**TOY.__dict__, "templates": ("a {}.", "a photo of a {}!")})
    head = H.zeroshot_head(encode_text, tokenize, toy, logit_scale=1.0)
    assert head.shape == (2, 16)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(2))
    with pytest.raises(EPMQError, match="CLIPModel"):
        H.hf_clip_text_encoder(tmp_path / "missing")
