"""The ``clip`` suite (epmq.suites.clip) on tiny stand-ins with the real file layouts, fully offline: a random
2-layer ``CLIPModel`` with a hand-made CLIP tokenizer saved by ``save_pretrained`` (the base), perturbed
``CLIPVisionModel`` experts in both transformers key layouts, and small image datasets saved with
``DatasetDict.save_to_disk`` in the hub schema (``image`` + ``label`` ClassLabel)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from epmq.errors import EPMQError
from epmq.suites import DEFAULT_TASKS, get_suite
from epmq.suites import clip as S
from epmq.tasks.clip import get_task

TASKS = ("mnist", "eurosat")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION = dict(SMALL, image_size=32, patch_size=8)
OPTS = {"tasks": TASKS, "image_size": 32, "n_val": 6, "calib_pool": 10, "eval_batch_size": 4, "device": "cpu",
        "progress": False}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _tiny_clip(path):
    chars = [chr(i) for i in range(33, 127)]  # printable ASCII: byte-level BPE maps these to themselves
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                            "model_max_length": 77}))
    eot = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(SMALL, vocab_size=len(vocab), max_position_embeddings=77, eos_token_id=eot,
                         pad_token_id=eot, bos_token_id=vocab["<|startoftext|>"]),
        vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(path)
    return model


def _expert(base, path, seed, *, prefixed=False, **overrides):
    """A perturbed CLIPVisionModel of the base, saved; ``prefixed``: the transformers < 5 key layout."""
    from safetensors.torch import save_file

    from epmq.models.sources import clip_vision_keys

    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**VISION, **overrides})).eval()
    if not overrides:
        model.load_state_dict(clip_vision_keys(base.state_dict()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3))
    model.save_pretrained(path)
    if prefixed:
        sd = {"vision_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(path / "model.safetensors"))
    return model


def _dataset(path, task, n_train, n_test, seed):
    from PIL import Image

    names = list(get_task(task).classnames)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (48, 40), (32, 32), (36, 44), (64, 40)]  # portrait, landscape, square, odd margins
    mode = "L" if task == "mnist" else "RGB"

    def split(n):
        imgs = []
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            shape = (h, w) if mode == "L" else (h, w, 3)
            imgs.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode))
        labels = [int(x) for x in rng.integers(0, len(names), n)]
        return datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipworld")
    base = _tiny_clip(root / "base")
    experts = {"mnist": _expert(base, root / "exp_mnist", 1),
               "eurosat": _expert(base, root / "exp_eurosat", 2, prefixed=True)}
    _expert(base, root / "exp_bad", 3, intermediate_size=48)
    data = {"mnist": _dataset(root / "ds_mnist", "mnist", 24, 10, 0),
            "eurosat": _dataset(root / "ds_eurosat", "eurosat", 20, 9, 1)}
    opts = dict(OPTS, base=str(root / "base"), experts=str(root / "exp_{task}"), datasets=data)
    return {"root": root, "base": base, "experts": experts, "opts": opts}


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """A suite whose base, heads and experts are built once (read-only for the tests that use it)."""
    suite = S.ClipSuite(tmp_path_factory.mktemp("cache"), **world["opts"])
    suite.build_base()
    for t in TASKS:
        suite.build_expert(t)
    return suite


def _image_features(clip, x):
    """CLIP's projected image features (transformers >= 5 wraps them in a ModelOutput's pooler_output)."""
    f = clip.get_image_features(pixel_values=x)
    return f if torch.is_tensor(f) else f.pooler_output


def _pixels(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ options


def test_registered_with_its_default_tasks(tmp_path):
    assert tuple(S.DEFAULTS["tasks"]) == DEFAULT_TASKS["clip"]
    suite = get_suite("clip", tmp_path, tasks=["mnist"])
    assert isinstance(suite, S.ClipSuite) and suite.adapter == "hf_clip_vision"
    assert suite.expert_source("mnist") == "tanganke/clip-vit-base-patch32_mnist"


@pytest.mark.parametrize("opts, match", [
    ({"bogus": 1}, "unknown option.*bogus"),
    ({"layout": "timm"}, "layout="),
    ({"tasks": ["Stanford_Cars"]}, "stanford-cars"),
    ({"tasks": ["imagenet"]}, "unknown CLIP task"),
    ({"experts": "one/source"}, "experts="),
    ({"experts": {"mnist": "a/b"}}, "eurosat"),
    ({"n_val": 0}, "n_val="),
    ({"precision": "int8"}, "precision="),
    ({"arch": "ViT-B-32"}, "open_clip"),
])
def test_bad_options_raise_one_line(tmp_path, opts, match):
    with pytest.raises(EPMQError, match=match) as e:
        S.ClipSuite(tmp_path, **{"tasks": TASKS, **opts})
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ models


def test_build_base_writes_base_projection_and_unit_norm_scaled_heads(built, world):
    from epmq.models.sources import clip_vision_keys, load_state_dict

    base = world["base"]
    sd = load_state_dict(built.base_path)
    ref = clip_vision_keys(base.state_dict())
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    meta = json.loads(built.base_path.with_suffix(".json").read_text())
    scale = float(base.logit_scale.detach().exp())
    assert meta["source"] == world["opts"]["base"] and meta["revision"] is None
    assert meta["logit_scale"] == pytest.approx(scale) and meta["layout"] == "hf"
    proj = load_state_dict(built.projection_path)["weight"]
    assert torch.equal(proj, base.visual_projection.weight)
    for t in TASKS:
        w = load_state_dict(built.head_path(t))["head"]
        assert w.shape == (10, 16)
        torch.testing.assert_close(w.norm(dim=-1), torch.full((10,), scale))
        hmeta = json.loads(built.head_path(t).with_suffix(".json").read_text())
        assert hmeta["n_classes"] == 10 and hmeta["base_model"] == world["opts"]["base"]
    # the head = zero-shot classifier applied to visual_projection(pooler_output)
    x = _pixels()
    h = built.head("mnist")
    with torch.no_grad():
        logits = h(built.base_encoder()(pixel_values=x))
        feats = torch.nn.functional.normalize(_image_features(base, x), dim=-1)
    torch.testing.assert_close(logits, feats @ h.weight.t(), atol=1e-4, rtol=1e-4)


def test_experts_round_trip_both_key_layouts(built, world):
    from epmq.models.adapters import get_adapter

    x = _pixels()
    for t in TASKS:
        path = built.expert_path(t)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["source"] == str(world["root"] / f"exp_{t}") and meta["relative_delta"] > 0
        enc = built.load_encoder(path)
        assert get_adapter(enc).name == built.adapter
        with torch.no_grad():
            torch.testing.assert_close(enc(pixel_values=x).pooler_output,
                                       world["experts"][t](pixel_values=x).pooler_output)
        # also from a state dict in the old prefixed layout
        sd = {"vision_model." + k: v for k, v in world["experts"][t].state_dict().items()}
        with torch.no_grad():
            torch.testing.assert_close(built.load_encoder(sd)(pixel_values=x).pooler_output,
                                       enc(pixel_values=x).pooler_output)
    # cached: not rewritten; strict loading refuses a foreign state dict
    mtime = built.expert_path("mnist").stat().st_mtime_ns
    assert built.build_expert("mnist") == built.expert_path("mnist")
    assert built.expert_path("mnist").stat().st_mtime_ns == mtime
    with pytest.raises(EPMQError, match="mismatch"):
        built.load_encoder({"foo": torch.zeros(1)} | {k: v for k, v in built.base_state_dict().items()})


def test_expert_source_change_reimports_and_mismatch_names_the_task(built, world, tmp_path):
    import shutil

    shutil.copytree(built.cache_dir, tmp_path / "c", ignore=shutil.ignore_patterns("data"))
    other = dict(world["opts"], experts={"mnist": world["opts"]["experts"].format(task="eurosat"),
                                         "eurosat": str(world["root"] / "exp_bad")})
    suite = S.ClipSuite(tmp_path / "c", **other)
    suite.build_expert("mnist")  # another source: re-imported
    from epmq.models.sources import load_state_dict

    a, b = load_state_dict(suite.expert_path("mnist")), load_state_dict(built.expert_path("eurosat"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(EPMQError, match=r"expert 'eurosat'.*shape") as e:
        suite.build_expert("eurosat")
    assert "\n" not in str(e.value)


def test_open_clip_layout_matches_hf(world, built, tmp_path):
    from epmq.models.adapters import get_adapter

    oc = S.ClipSuite(tmp_path, layout="open_clip", **world["opts"])
    assert oc.adapter == "openclip_vit"
    oc.build_base()
    enc = oc.load_encoder(oc.build_expert("eurosat"))
    assert get_adapter(enc).name == "openclip_vit"
    x = _pixels()
    ref = world["experts"]["eurosat"]
    with torch.no_grad():
        want = ref(pixel_values=x).pooler_output @ world["base"].visual_projection.weight.t()
        torch.testing.assert_close(enc(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(oc.head("eurosat")(enc(x)), built.head("eurosat")(ref(pixel_values=x)),
                                   atol=1e-3, rtol=1e-4)
    batch = oc.calibration_batches("eurosat", 4, seed=0, batch_size=4)[0]
    assert get_adapter(enc).run(enc, batch).shape == (4, 16)


# ------------------------------------------------------------------------------------------------ data


def test_preprocessing_matches_clip_image_processor():
    from PIL import Image

    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = proc_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    for w, h in ((40, 48), (56, 40), (32, 32)):  # even crop margins: HF and torchvision crop alike
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = S.normalize_images(torch.from_numpy(S.clip_preprocess(img, 32).copy())[None])
        ref = torch.as_tensor(np.asarray(proc(img)["pixel_values"][0]).copy())
        torch.testing.assert_close(ours[0], ref, atol=1e-5, rtol=0)
    # odd margin: torchvision's CenterCrop (OpenAI's preprocess) offsets by round(19 / 2) = 10, HF by 9
    img = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    full = np.asarray(img.resize((51, 32), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(S.clip_preprocess(img, 32), full[:, :, 10:42])
    gray = Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), mode="L")
    assert S.clip_preprocess(gray, 32).shape == (3, 32, 32)


def test_evaluation_equals_hand_computation_and_is_deterministic(built, world):
    from safetensors.torch import load_file

    base = world["base"]
    for t in TASKS:
        rec = built.evaluate(built.base_encoder(), t)
        d = load_file(str(built.data_file(t, "test")))
        assert d["images"].dtype == torch.uint8 and d["images"].shape[1:] == (3, 32, 32)
        with torch.no_grad():
            f = _image_features(base, S.normalize_images(d["images"]))
            head = load_file(str(built.head_path(t)))["head"]
            pred = (torch.nn.functional.normalize(f, dim=-1) @ head.t()).argmax(-1)
        correct = int((pred == d["labels"]).sum())
        assert (rec["n"], rec["correct"]) == (len(d["labels"]), correct)
        assert rec["accuracy"] == pytest.approx(100 * correct / rec["n"])
    enc = built.expert_encoder("mnist")
    assert built.evaluate_all(enc) == built.evaluate_all(enc)
    out = built.evaluate_all(enc, split="validation")
    assert set(out["tasks"]) == set(TASKS) and out["tasks"]["mnist"]["n"] == 6
    assert out["mean"] == pytest.approx(sum(r["accuracy"] for r in out["tasks"].values()) / 2)


def test_preprocessing_cache_written_once_and_reused(built, world, monkeypatch):
    paths = {s: built.data_file("mnist", s) for s in S.SPLITS}
    mtimes = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    assert all(p.with_suffix(".json").is_file() for p in paths.values())

    def no_dataset(*a, **k):
        raise AssertionError("the dataset was read again")

    fresh = S.ClipSuite(built.cache_dir, **world["opts"])  # a new process: reads the cache only
    monkeypatch.setattr(S.ClipSuite, "_dataset", no_dataset)
    fresh.evaluate(fresh.base_encoder(), "mnist")
    fresh.calibration_batches("mnist", 3, seed=1)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == mtimes
    # another image size is another cache: rebuilt, which needs the dataset
    other = S.ClipSuite(built.cache_dir, **dict(world["opts"], image_size=16))
    with pytest.raises(AssertionError, match="read again"):
        other.data_file("mnist", "test")


def test_validation_calibration_and_test_are_disjoint_and_seeded(built, world, tmp_path):
    from safetensors.torch import load_file

    for t in TASKS:
        val, pool = set(built.indices(t, "validation").tolist()), built.indices(t, "train").tolist()
        assert len(val) == 6 and len(pool) == 10 and not val & set(pool)
        n_train = len(datasets.load_from_disk(world["opts"]["datasets"][t])["train"])
        assert max(val | set(pool)) < n_train
        pool_imgs = load_file(str(built.data_file(t, "train")))["images"]
        val_imgs = load_file(str(built.data_file(t, "validation")))["images"]
        batches = built.calibration_batches(t, 7, seed=3, batch_size=3)
        assert [len(b) for b in batches] == [3, 3, 1] and batches[0].dtype == torch.float32
        drawn = torch.cat(batches)
        pool_n, val_n = S.normalize_images(pool_imgs), S.normalize_images(val_imgs)
        for x in drawn:  # every calibration image is a pool image, none a validation image
            assert any(torch.equal(x, p) for p in pool_n) and not any(torch.equal(x, v) for v in val_n)
        again = torch.cat(built.calibration_batches(t, 7, seed=3, batch_size=3))
        assert torch.equal(drawn, again)
        draws = {tuple(torch.cat(built.calibration_batches(t, 7, seed=k)).flatten()[::97].tolist()) for k in range(4)}
        assert len(draws) > 1  # the seed matters (two seeds may still draw the same 7 of 10)
    with pytest.raises(EPMQError, match="calib_pool"):
        built.calibration_batches("mnist", 11, seed=0)
    # max_test: a deterministic, seeded subset of the test split
    capped = [S.ClipSuite(tmp_path / f"c{i}", **dict(world["opts"], max_test=4)) for i in range(2)]
    a, b = (s.indices("mnist", "test").tolist() for s in capped)
    assert a == b and len(a) == 4 and a == sorted(a)
    seeded = {tuple(S.ClipSuite(tmp_path / f"s{k}", seed=k, **dict(world["opts"], max_test=4))
                    .split_indices("mnist", "test", 10).tolist()) for k in range(1, 4)}
    assert len(seeded | {tuple(a)}) > 1  # the suite seed picks the subset


# ------------------------------------------------------------------------------------------------ offline


def test_offline_prefetch_lists_everything_missing(tmp_path, monkeypatch, world):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    suite = S.ClipSuite(tmp_path / "c", tasks=TASKS, base="nobody/no-base", experts="nobody/no-expert_{task}",
                        data_dir=str(tmp_path / "hfds"))
    with pytest.raises(EPMQError) as e:
        suite.prefetch()
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg
    for name in ("nobody/no-base", "nobody/no-expert_mnist", "nobody/no-expert_eurosat", "ylecun/mnist",
                 "tanganke/eurosat"):
        assert name in msg
    with pytest.raises(EPMQError, match=r"mnist: dataset 'ylecun/mnist'.*fetch"):
        suite.data_file("mnist", "test")
    # everything local: nothing missing; preprocess writes every data cache
    ok = S.ClipSuite(tmp_path / "ok", **world["opts"])
    out = ok.prefetch(preprocess=True)
    assert out["datasets"]["mnist"] == world["opts"]["datasets"]["mnist"]
    assert all(ok.data_path(t, s).is_file() for t in TASKS for s in S.SPLITS)
    assert not os.path.exists(tmp_path / "hf" / "hub")


# ------------------------------------------------------------------------------------------------ revisions

SHA = {k: c * 40 for k, c in (("base", "1"), ("mnist", "2"), ("eurosat", "3"), ("ds_mnist", "4"),
                              ("ds_eurosat", "5"), ("other", "6"))}
HUB_MODELS = {"acme/tiny-clip": ("base", "base"), "acme/tiny-clip_mnist": ("exp_mnist", "mnist"),
              "acme/tiny-clip_eurosat": ("exp_eurosat", "eurosat")}


@pytest.fixture(scope="module")
def hub(world, tmp_path_factory):
    """The stand-ins as the hub would serve them: an HF model cache (``refs/main`` -> ``snapshots/<commit>``) of
    the base and the experts, and each dataset split saved under a folder named by its commit (as ``datasets``
    caches a hub dataset: ``.../<commit>/*.arrow``)."""
    root = tmp_path_factory.mktemp("hub")
    for hub_id, (folder, key) in HUB_MODELS.items():
        repo = root / "models" / ("models--" + hub_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(SHA[key])
        shutil.copytree(world["root"] / folder, repo / "snapshots" / SHA[key])
    for task in TASKS:
        dd = datasets.load_from_disk(world["opts"]["datasets"][task])
        for split in ("train", "test"):
            dd[split].save_to_disk(str(root / "data" / get_task(task).hf_dataset / split / SHA[f"ds_{task}"]))
    return root


def _serve(monkeypatch, hub) -> list:
    """Route every hub download through ``hub`` (models: the real offline ``snapshot_download`` on its cache;
    datasets: the one cached commit, as offline ``datasets`` takes the latest cached one whatever is asked) and
    log ``(kind, id, revision)`` of each call."""
    import huggingface_hub

    calls, real = [], huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kw):
        calls.append(("model", repo_id, kw["revision"]))
        return real(repo_id, **{**kw, "cache_dir": str(hub / "models")})

    def load_dataset(path, name=None, *, split, revision=None, **kw):
        calls.append(("dataset", path, revision))
        (cached,) = (hub / "data" / path / split).iterdir()
        return datasets.load_from_disk(str(cached))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


PINS = {"models": {"acme/tiny-clip": SHA["base"], "acme/tiny-clip_mnist": SHA["mnist"],
                   "acme/tiny-clip_eurosat": "main"},
        "datasets": {"ylecun/mnist": SHA["ds_mnist"], "tanganke/eurosat": "main"}}
HUB_OPTS = dict(OPTS, base="acme/tiny-clip", experts="acme/tiny-clip_{task}")


def test_revisions_option_is_checked(tmp_path, world):
    s = S.ClipSuite(tmp_path, **HUB_OPTS, revisions=PINS)
    assert s.hub_models() == list(PINS["models"]) and s.hub_datasets() == ["ylecun/mnist", "tanganke/eurosat"]
    assert s.model_revision("acme/tiny-clip_eurosat") == "main"
    assert s.dataset_revision("ylecun/mnist") == SHA["ds_mnist"]
    assert S.ClipSuite(tmp_path, **HUB_OPTS).model_revision("acme/tiny-clip") is None  # unpinned: the default branch
    local = S.ClipSuite(tmp_path, **world["opts"], revisions={})  # nothing read from the hub: nothing to pin
    assert local.hub_models() == [] and local.hub_datasets() == []
    short = {"models": {k: v for k, v in PINS["models"].items() if "eurosat" not in k}, "datasets": PINS["datasets"]}
    bad = [({"models": [SHA["base"]]}, r"revisions.models=\["),
           (["main"], r"revisions=\['main'\]"),
           ({"weights": {}}, "revisions="),
           ({**PINS, "datasets": {**PINS["datasets"], "ylecun/mnist": "no good"}},
            r"revisions.datasets\['ylecun/mnist'\]: revision 'no good'"),
           (short, r"revisions.models has no revision for \['acme/tiny-clip_eurosat'\]"),
           ({**PINS, "datasets": {**PINS["datasets"], "uoft-cs/cifar10": "main"}},
            r"revisions.datasets names \['uoft-cs/cifar10'\], which this suite does not read")]
    for revs, match in bad:
        with pytest.raises(EPMQError, match=match) as e:
            S.ClipSuite(tmp_path, **HUB_OPTS, revisions=revs)
        assert "\n" not in str(e.value) and str(e.value).startswith("clip suite: ")


def test_pinned_revisions_reach_every_download_and_are_recorded(hub, tmp_path, monkeypatch):
    calls = _serve(monkeypatch, hub)
    suite = S.ClipSuite(tmp_path / "c", **HUB_OPTS, revisions=PINS)
    out = suite.prefetch(preprocess=True)
    read = {"models": {"acme/tiny-clip": SHA["base"], "acme/tiny-clip_mnist": SHA["mnist"],
                       "acme/tiny-clip_eurosat": SHA["eurosat"]},
            "datasets": {"ylecun/mnist": SHA["ds_mnist"], "tanganke/eurosat": SHA["ds_eurosat"]}}
    assert out["revisions"] == read and out["revisions_pinned"] == PINS
    suite.build_base()
    for t in TASKS:
        suite.build_expert(t)
    # every download asked for its pin; the heads read the base at the commit base.json recorded
    pinned = {**PINS["models"], **PINS["datasets"]}
    assert {i for _, i, _ in calls} == set(pinned)
    assert [c for c in calls if c[2] != pinned[c[1]]] == []
    assert sum(c[0] == "dataset" for c in calls) == (2 + 3) * len(TASKS)  # prefetch: 2 splits; preprocessing: 3
    meta = {p: json.loads(p.with_suffix(".json").read_text()) for p in
            (suite.base_path, suite.projection_path, *(suite.expert_path(t) for t in TASKS))}
    assert (meta[suite.base_path]["revision"], meta[suite.base_path]["revision_pinned"]) == (SHA["base"], SHA["base"])
    assert meta[suite.projection_path]["revision"] == SHA["base"]
    assert (meta[suite.expert_path("mnist")]["revision"], meta[suite.expert_path("mnist")]["revision_pinned"]) == (
        SHA["mnist"], SHA["mnist"])
    assert (meta[suite.expert_path("eurosat")]["revision"], meta[suite.expert_path("eurosat")]["revision_pinned"]) == (
        SHA["eurosat"], "main")  # a branch: the commit it was at is what the record keeps
    assert json.loads(suite.head_path("mnist").with_suffix(".json").read_text())["revision"] == SHA["base"]
    for task, split in (("mnist", "test"), ("eurosat", "train")):
        d = json.loads(suite.data_path(task, split).with_suffix(".json").read_text())
        assert (d["hub_dataset"], d["revision"], d["revision_pinned"]) == (
            get_task(task).hf_dataset, SHA[f"ds_{task}"], PINS["datasets"][get_task(task).hf_dataset])

    # a pin that differs from the commit a cached artefact was built from is refused, naming the model / dataset
    other = SHA["other"]
    moved = {"models": {**PINS["models"], "acme/tiny-clip_mnist": other}, "datasets": PINS["datasets"]}
    with pytest.raises(EPMQError, match=rf"^expert 'mnist' \(acme/tiny-clip_mnist\) is pinned to revision {other} "
                                        rf"but the cached \S+mnist.safetensors was built from {SHA['mnist']}: delete"):
        S.ClipSuite(tmp_path / "c", **HUB_OPTS, revisions=moved).build_expert("mnist")
    moved = {"models": PINS["models"], "datasets": {**PINS["datasets"], "ylecun/mnist": other}}
    with pytest.raises(EPMQError, match=rf"^dataset 'ylecun/mnist' \(mnist/test\) is pinned to revision {other} "
                                        rf"but the cached \S+ was built from {SHA['ds_mnist']}"):
        S.ClipSuite(tmp_path / "c", **HUB_OPTS, revisions=moved).data_file("mnist", "test")
    # a new cache: `datasets` hands over another commit than the pinned one (offline it takes the latest cached)
    with pytest.raises(EPMQError, match=rf"^mnist: dataset 'ylecun/mnist' split 'test' is pinned to revision {other} "
                                        rf"but `datasets` loaded {SHA['ds_mnist']}"):
        S.ClipSuite(tmp_path / "fresh", **HUB_OPTS, revisions=moved).data_file("mnist", "test")
    # ... or the HF cache has no snapshot of a pinned commit: fetch lists the model (and the dataset) at once
    moved = {"models": {**PINS["models"], "acme/tiny-clip": other},
             "datasets": {**PINS["datasets"], "ylecun/mnist": other}}
    with pytest.raises(EPMQError) as e:
        S.ClipSuite(tmp_path / "fresh", **HUB_OPTS, revisions=moved).prefetch(preprocess=False)
    msg = str(e.value)
    assert msg.startswith("clip suite: 3 source(s) offline") and "model acme/tiny-clip;" in msg
    assert "dataset ylecun/mnist [train] (mnist) (another revision than the pinned one)" in msg
    assert "acme/tiny-clip_mnist" not in msg and "eurosat" not in msg
