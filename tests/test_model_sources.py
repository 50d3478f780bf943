"""Model sources: hub-id resolution (offline, fake HF cache), safe state-dict loading, HF CLIP layouts,
open_clip visual towers, FLAN-T5 tied weights, expert checks. Tiny random models, no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from epmq.errors import EPMQError
from epmq.io import save_safetensors_atomic, write_json_atomic
from epmq.models import sources as S

transformers = pytest.importorskip("transformers")

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
CLIP_VISION = {**TOWER, "image_size": 32, "patch_size": 8}
CLIP_TEXT = {**TOWER, "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
T5_TINY = {
    "vocab_size": 64,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "decoder_start_token_id": 0,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: resolve() must see the offline switch set at run time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _copy_with(src, dst, sd):
    """A model folder ``dst`` with ``src``'s config.json and the state dict ``sd``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_safetensors_atomic(dst / "model.safetensors", sd)
    return dst


# --------------------------------------------------------------------------------------------- HF CLIP


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION)).eval()
    folder = tmp_path_factory.mktemp("clipv")
    model.save_pretrained(folder)
    return model, folder


def test_installed_clip_vision_layout_is_the_canonical_one(clip_vision):
    model, folder = clip_vision
    keys = list(model.state_dict())
    assert S.CLIP_VISION_LAYOUT == "flat"
    assert all(k.startswith(S.CLIP_VISION_ROOTS) for k in keys)
    assert "encoder.layers.0.self_attn.q_proj.weight" in keys
    assert S.clip_vision_keys(model.state_dict()).keys() == model.state_dict().keys()
    assert sorted(S.load_state_dict(folder)) == sorted(keys)


def test_clip_vision_both_layouts_load_to_identical_weights(clip_vision, tmp_path):
    model, folder = clip_vision
    ref = model.state_dict()
    prefixed = {"vision_model." + k: v for k, v in ref.items()}
    prefixed["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # as old checkpoints carry it
    other = _copy_with(folder, tmp_path / "prefixed", prefixed)
    a = S.load_clip_vision(folder)
    b = S.load_clip_vision(other)
    assert not a.training and not b.training
    _same(a.state_dict(), ref)
    _same(b.state_dict(), ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(pixel_values=x).pooler_output, b(pixel_values=x).pooler_output)


def test_clip_model_checkpoint_gives_its_vision_tower(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.CLIPConfig(vision_config=CLIP_VISION, text_config=CLIP_TEXT, projection_dim=16)
    full = transformers.CLIPModel(cfg)
    full.save_pretrained(tmp_path)
    sd = S.load_state_dict(tmp_path)
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= sd.keys()
    vision = S.clip_vision_keys(sd)
    assert not any(k.startswith(("text_model.", "vision_model.")) for k in vision)
    model = S.load_clip_vision(tmp_path)  # config.json is a CLIPConfig: its vision_config is used
    assert model.config.hidden_size == 32 and model.config.image_size == 32
    want = {k.removeprefix("vision_model."): v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    _same(model.state_dict(), want)


def test_clip_vision_keys_rejects_mixed_and_foreign_layouts():
    t = torch.zeros(1)
    with pytest.raises(EPMQError, match="mixes layouts.*vision_model.encoder"):
        S.clip_vision_keys({"vision_model.encoder.layers.0.x": t, "encoder.layers.0.y": t})
    with pytest.raises(EPMQError, match="not a CLIP vision state dict.*conv1.weight"):
        S.clip_vision_keys({"conv1.weight": t})


def test_load_clip_vision_names_bad_weights(clip_vision, tmp_path):
    model, folder = clip_vision
    sd = dict(model.state_dict())
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(EPMQError, match=r"missing: 'encoder.layers.1.mlp.fc2.bias'"):
        S.load_clip_vision(folder, weights=sd)
    sd = dict(model.state_dict())
    sd["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 32)
    msg = r"'encoder.layers.0.mlp.fc1.weight' has shape \(3, 32\) but the model has \(64, 32\)"
    with pytest.raises(EPMQError, match=msg):
        S.load_clip_vision(folder, weights=sd)


# --------------------------------------------------------------------------------------------- expert checks


def test_check_expert_messages():
    base = {"encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 32), "encoder.layers.0.mlp.fc1.bias": torch.zeros(64)}
    S.check_expert(base, {k: v + 1 for k, v in base.items()}, "ok")
    wrong = dict(base, **{"encoder.layers.0.mlp.fc1.weight": torch.zeros(32, 32)})
    with pytest.raises(EPMQError) as e:
        S.check_expert(base, wrong, "mnist")
    assert str(e.value) == (
        "expert 'mnist': key 'encoder.layers.0.mlp.fc1.weight' has shape (32, 32) but the base has (64, 32)"
    )
    msg = r"expert 'svhn': 1 key\(s\) of the base missing: 'encoder.layers.0.mlp.fc1.bias'"
    with pytest.raises(EPMQError, match=msg):
        S.check_expert(base, {"encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 32)}, "svhn")
    extra = dict(base, **{f"x{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(EPMQError, match=r"5 unexpected key\(s\) not in the base: 'x0', 'x1', 'x2' \(\+2 more\)"):
        S.check_expert(base, extra, "dtd")
    nan = dict(base, **{"encoder.layers.0.mlp.fc1.bias": torch.full((64,), float("nan"))})
    with pytest.raises(EPMQError, match=r"expert 'gtsrb': key 'encoder.layers.0.mlp.fc1.bias' has 64 non-finite"):
        S.check_expert(base, nan, "gtsrb")


# --------------------------------------------------------------------------------------------- state dicts


def test_torch_checkpoints_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}
    torch.save(sd, tmp_path / "plain.pt")
    _same(S.load_state_dict(tmp_path / "plain.pt"), sd)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    _same(S.load_state_dict(tmp_path / "wrapped.pth"), sd)
    torch.save({"a.weight": sd["a.weight"], "opt": "adam"}, tmp_path / "mixed.bin")
    with pytest.raises(EPMQError, match="entry 'opt' is a str, not a tensor"):
        S.load_state_dict(tmp_path / "mixed.bin")


class Custom:  # a pickled object that weights_only must refuse
    pass


def test_pickle_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save({"w": torch.ones(2), "encoder": Custom()}, path)
    with pytest.raises(EPMQError) as e:
        S.load_state_dict(path)
    msg = str(e.value)
    assert "finetuned.pt" in msg and "Custom" in msg and "refusing to unpickle" in msg and "safetensors" in msg
    assert "\n" not in msg


def test_corrupt_files_are_named(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EPMQError, match=r"trunc.pt: cannot read torch checkpoint.*corrupt"):
        S.load_state_dict(tmp_path / "trunc.pt")
    save_safetensors_atomic(tmp_path / "ok.safetensors", {"w": torch.ones(100)})
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[:-8])
    with pytest.raises(EPMQError, match=r"bad.safetensors: not a readable safetensors file"):
        S.load_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(EPMQError, match="does not exist"):
        S.load_state_dict(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EPMQError, match="no weights file"):
        S.load_state_dict(tmp_path / "empty")


def test_sharded_safetensors_index(tmp_path):
    a, b = {"x": torch.randn(2)}, {"y": torch.randn(3)}
    save_safetensors_atomic(tmp_path / "model-00001-of-00002.safetensors", a)
    save_safetensors_atomic(tmp_path / "model-00002-of-00002.safetensors", b)
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    write_json_atomic(tmp_path / "model.safetensors.index.json", index)
    _same(S.load_state_dict(tmp_path), {**a, **b})
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EPMQError, match="shard 'model-00002-of-00002.safetensors' is missing"):
        S.load_state_dict(tmp_path)


# --------------------------------------------------------------------------------------------- resolve / missing


def _fake_snapshot(cache, hub_id, files):
    """A hub snapshot as huggingface_hub lays it out: refs/main -> snapshots/<commit>/<files>."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in files:
        if name.endswith(".safetensors"):
            save_safetensors_atomic(snap / name, {"w": torch.ones(1)})
        elif name.endswith(".bin"):
            torch.save({"w": torch.ones(1)}, snap / name)
        else:
            write_json_atomic(snap / name, {"model_type": "clip_vision_model"})
    return snap


def test_resolve_local_and_missing_hub_id_offline(tmp_path):
    assert S.resolve(tmp_path) == tmp_path
    t0 = time.perf_counter()
    with pytest.raises(EPMQError) as e:
        S.resolve("tanganke/clip-vit-base-patch32_nosuchtask", cache_dir=tmp_path / "hf")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "'tanganke/clip-vit-base-patch32_nosuchtask'" in msg and "offline" in msg
    assert "hf download tanganke/clip-vit-base-patch32_nosuchtask" in msg and "\n" not in msg
    with pytest.raises(EPMQError, match="neither an existing path nor a hub id"):
        S.resolve(tmp_path / "not" / "here")


def test_offline_env_is_read_at_call_time(tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE at import; resolve() must still honour a later change."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    assert S._offline()  # the autouse fixture set the env var after import
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not S._offline()


def test_missing_and_fake_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    snap = _fake_snapshot(cache, "acme/present", ["config.json", "model.safetensors"])
    _fake_snapshot(cache, "acme/partial", ["config.json"])  # interrupted: no weights yet
    bin_only = _fake_snapshot(cache, "acme/old", ["config.json", "pytorch_model.bin"])  # no safetensors: *.bin used
    _fake_snapshot(cache, "acme/sharded", ["config.json", "model-00001-of-00002.safetensors"])
    write_json_atomic(
        cache / "models--acme--sharded/snapshots" / snap.name / "model.safetensors.index.json",
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}},
    )
    local = tmp_path / "local_model"
    local.mkdir()
    sources = [str(local), "acme/present", "acme/partial", "acme/absent", str(tmp_path / "gone"), "acme/absent"]
    sources += ["acme/old", "acme/sharded"]
    want = ["acme/partial", "acme/absent", str(tmp_path / "gone"), "acme/sharded"]
    assert S.missing(sources, cache_dir=cache) == want
    assert S.resolve("acme/present", cache_dir=cache) == snap
    assert S.resolve("acme/old", cache_dir=cache) == bin_only
    _same(S.load_state_dict(bin_only), {"w": torch.ones(1)})
    with pytest.raises(EPMQError, match=r"'acme/partial' is incomplete .*no \*.safetensors or \*.bin weights"):
        S.resolve("acme/partial", cache_dir=cache)


# --------------------------------------------------------------------------------------------- revisions

SHA_A = "a" * 40
SHA_B = "b" * 40


def test_revision_helpers():
    assert S.is_commit(SHA_A) and not S.is_commit("main") and not S.is_commit("A" * 40) and not S.is_commit(None)
    for ok in (SHA_A, "main", "v1.0", "refs/pr/3"):
        assert S.check_revision(ok, "x") == ok
    for bad in ("", "a b", "../x", "-x", None, 3):
        with pytest.raises(EPMQError, match=r"^who: revision .*40-hex commit SHA or a branch / tag name$"):
            S.check_revision(bad, "who")
    assert S.snapshot_revision("/c/models--a--b/snapshots/" + SHA_A) == SHA_A
    assert S.snapshot_revision("/somewhere/model") is None


def test_resolve_passes_the_revision_to_snapshot_download_and_refuses_another_commit(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    gives = {"commit": SHA_A}

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(_fake_snapshot_at(tmp_path / f"hub{len(calls)}", repo_id, gives["commit"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert S.resolve("acme/pinned", revision=SHA_A).name == SHA_A
    assert [kw["revision"] for _, kw in calls] == [SHA_A]
    assert S.resolve("acme/pinned", revision="main").name == SHA_A  # a branch: whatever commit it is at
    assert calls[-1][1]["revision"] == "main"
    assert S.resolve("acme/pinned").name == SHA_A and calls[-1][1]["revision"] is None  # unpinned
    gives["commit"] = SHA_B  # the cache hands over another commit than the pinned one: refused, naming the model
    with pytest.raises(EPMQError, match=rf"^hub model 'acme/pinned' is pinned to revision {SHA_A} but the HF cache "
                                        rf"gave snapshot {SHA_B} .*hf download acme/pinned --revision {SHA_A}"):
        S.resolve("acme/pinned", revision=SHA_A)
    with pytest.raises(EPMQError, match="hub model 'acme/pinned': revision 'no good'"):
        S.resolve("acme/pinned", revision="no good")


def _fake_snapshot_at(cache, hub_id, commit, ref="main"):
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    write_json_atomic(snap / "config.json", {"model_type": "clip_vision_model"})
    save_safetensors_atomic(snap / "model.safetensors", {"w": torch.ones(1)})
    return snap


def test_pinned_revision_in_a_real_offline_cache(tmp_path):
    cache = tmp_path / "hub"
    snap_a = _fake_snapshot_at(cache, "acme/m", SHA_A)  # refs/main -> A
    snap_b = _fake_snapshot_at(cache, "acme/m", SHA_B, ref="v2")  # tag v2 -> B, also cached
    assert S.resolve("acme/m", cache_dir=cache) == snap_a
    assert S.resolve("acme/m", revision=SHA_B, cache_dir=cache) == snap_b
    assert S.resolve("acme/m", revision="v2", cache_dir=cache) == snap_b
    absent = "c" * 40
    with pytest.raises(EPMQError, match=rf"^hub model 'acme/m' at revision '{absent}' not in the local HF cache"):
        S.resolve("acme/m", revision=absent, cache_dir=cache)
    assert S.missing(["acme/m", "acme/m2"], revision={"acme/m": absent}, cache_dir=cache) == ["acme/m", "acme/m2"]
    assert S.missing(["acme/m"], revision={"acme/m": SHA_B}, cache_dir=cache) == []
    assert S.missing(["acme/m"], revision=SHA_A, cache_dir=cache) == []


def test_hub_commit_asks_the_hub_at_the_revision(monkeypatch):
    import huggingface_hub

    asked = []

    class Info:
        sha = SHA_A

    def model_info(self, repo_id, revision=None, **kw):
        asked.append(("model", repo_id, revision))
        return Info()

    def dataset_info(self, repo_id, revision=None, **kw):
        asked.append(("dataset", repo_id, revision))
        if repo_id == "acme/offline":
            raise ConnectionError("no network")
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    assert S.hub_commit("acme/m", "main") == SHA_A
    assert S.hub_commit("acme/d", "v1", repo_type="dataset") == SHA_A
    assert asked == [("model", "acme/m", "main"), ("dataset", "acme/d", "v1")]
    with pytest.raises(EPMQError, match=r"^hub dataset 'acme/offline' at revision 'main': cannot ask .*internet$"):
        S.hub_commit("acme/offline", repo_type="dataset")


# --------------------------------------------------------------------------------------------- open_clip

TINY_VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}


def test_openclip_named_arch_from_shipped_config():
    with torch.device("meta"):  # architecture only: no weights allocated
        m = S.build_openclip_visual("ViT-B-32")
    assert tuple(m.conv1.weight.shape) == (768, 3, 32, 32)
    assert tuple(m.proj.shape) == (768, 512)
    assert len(m.transformer.resblocks) == 12
    assert m.transformer.resblocks[0].attn.num_heads == 12
    assert type(m.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with pytest.raises(EPMQError, match="unknown open_clip architecture 'ViT-X-99'"):
        S.build_openclip_visual("ViT-X-99")


def test_openclip_visual_prefixes(tmp_path):
    torch.manual_seed(2)
    ref = S.build_openclip_visual(TINY_VISION_CFG, output_dim=16).eval()
    bare = ref.state_dict()
    text = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32), "token_embedding.weight": torch.ones(9)}
    full = {**{"visual." + k: v for k, v in bare.items()}, **text, "logit_scale": torch.ones(())}
    task_arith = {"model." + k: v for k, v in full.items()}
    ddp = {"module." + k: v for k, v in bare.items()}
    save_safetensors_atomic(tmp_path / "full.safetensors", full)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
    for weights in (bare, ddp, task_arith, tmp_path / "full.safetensors"):
        _same(S.openclip_visual_keys(S._state_dict(weights)), bare)
        m = S.load_openclip_visual(TINY_VISION_CFG, weights)  # output_dim read from `proj`
        assert not m.training
        _same(m.state_dict(), bare)
        with torch.no_grad():
            assert torch.equal(m(x), want)
    with pytest.raises(EPMQError, match="unsupported key.*timm_model_name"):
        S.build_openclip_visual({**TINY_VISION_CFG, "timm_model_name": "vit"}, output_dim=16)
    broken = dict(bare)
    broken.pop("ln_post.bias")
    with pytest.raises(EPMQError, match="missing: 'ln_post.bias'"):
        S.load_openclip_visual(TINY_VISION_CFG, broken)


def test_hf_clip_vision_converts_to_openclip_with_the_same_features(clip_vision):
    """epmq.models.convert: a HF CLIPVisionModel + visual_projection -> an open_clip VisionTransformer (fused
    q/k/v, proj = projection.T) of the config read off the HF config, computing the same projected features."""
    from epmq.models.convert import hf_to_openclip_visual, hf_vision_keys, openclip_config_from_hf

    hf, _ = clip_vision
    projection = torch.randn(16, CLIP_VISION["hidden_size"], generator=torch.Generator().manual_seed(3))
    sd = S.clip_vision_keys(hf.state_dict())
    assert sorted(sd) == sorted(hf_vision_keys(2))
    oc_cfg = openclip_config_from_hf(hf.config, 16)
    assert oc_cfg["quick_gelu"] and oc_cfg["vision_cfg"]["head_width"] == 16 and oc_cfg["embed_dim"] == 16
    oc = S.build_openclip_visual(oc_cfg, quick_gelu=oc_cfg["quick_gelu"]).eval()
    converted = hf_to_openclip_visual(sd, projection)
    assert sorted(converted) == sorted(oc.state_dict())
    oc.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(oc(x), hf(pixel_values=x).pooler_output @ projection.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(EPMQError, match=r"not convertible to open_clip \(unexpected \['bogus'\], missing \[\]\)"):
        hf_to_openclip_visual({**sd, "bogus": torch.zeros(1)}, projection)
    with pytest.raises(EPMQError, match=r"missing \['post_layernorm.bias'\]"):
        hf_to_openclip_visual({k: v for k, v in sd.items() if k != "post_layernorm.bias"}, projection)


# --------------------------------------------------------------------------------------------- FLAN-T5


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    torch.manual_seed(3)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_TINY)).eval()
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder)
    return model, folder


def test_t5_tied_keys_dropped_or_present(t5, tmp_path):
    model, folder = t5
    ref = model.state_dict()
    saved = S.load_state_dict(folder)
    dropped = {k: v for k, v in saved.items() if k not in S.T5_TIED}
    explicit = {**dropped, **{k: dropped["shared.weight"].clone() for k in S.T5_TIED}}
    for weights in (folder, dropped, explicit):
        m = S.load_t5(folder, weights=None if weights is folder else weights)
        assert not m.training
        _same(m.state_dict(), ref)
        assert m.lm_head.weight is m.shared.weight
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        out = m(input_ids=ids, decoder_input_ids=torch.tensor([[0, 3]])).logits
        want = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 3]])).logits
    assert torch.equal(out, want)


FLAN_CONFIGS = {  # how an untied-head T5 (v1.1 / FLAN) says so
    "transformers4": {"tie_word_embeddings": False},  # the hub's google/flan-t5-* config.json
    "transformers5": {"tie_word_embeddings": True, "scale_decoder_outputs": False},  # re-saved by transformers 5
}


@pytest.mark.parametrize("style", sorted(FLAN_CONFIGS))
def test_t5_untied_head_as_flan(t5, tmp_path, style):
    _, folder = t5
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg.update(FLAN_CONFIGS[style])
    assert not S.t5_head_tied(cfg) and S.t5_head_tied({}) and S.t5_head_tied({"scale_decoder_outputs": True})
    untied = tmp_path / "flan"
    untied.mkdir()
    write_json_atomic(untied / "config.json", cfg)
    sd = {k: v for k, v in S.load_state_dict(folder).items() if k not in S.T5_TIED}
    head = torch.randn_like(sd["shared.weight"])
    save_safetensors_atomic(untied / "model.safetensors", {**sd, "lm_head.weight": head})
    m = S.load_t5(untied)
    assert getattr(m.config, "scale_decoder_outputs", False) is False  # transformers 5: T5 v1.1 / FLAN semantics
    assert m.lm_head.weight is not m.shared.weight
    assert torch.equal(m.lm_head.weight, head) and torch.equal(m.shared.weight, sd["shared.weight"])
    assert m.encoder.embed_tokens.weight is m.shared.weight
    with pytest.raises(EPMQError, match="'lm_head.weight' is missing but config.json describes an untied head"):
        S.load_t5(untied, weights=sd)


def test_t5_linear_names(t5):
    model, _ = t5
    names = S.t5_linear_names(model)
    # per encoder block: q k v o + wi_0 wi_1 wo = 7; per decoder block: + EncDecAttention q k v o = 11
    assert len(names) == 2 * 7 + 2 * 11 == len(set(names))
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in names
    assert "decoder.block.1.layer.1.EncDecAttention.o.weight" in names
    assert "decoder.block.1.layer.2.DenseReluDense.wi_1.weight" in names
    params = dict(model.named_parameters())
    assert all(params[n].dim() == 2 for n in names)
    assert not any("lm_head" in n or "shared" in n or "relative_attention_bias" in n for n in names)


def test_import_is_cheap():
    heavy = "{'torch', 'transformers', 'huggingface_hub', 'safetensors'}"
    code = f"import sys, epmq.models.sources; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
