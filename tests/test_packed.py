"""Packed low-bit checkpoints: bit packing, QuantLinear / MHA parametrization, save/load round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from epmq.errors import EPMQError
from epmq.quant.grid import GridSpec, dequantize, find_params, quantize_codes
from epmq.quant.packed import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PackedParam,
    QuantLinear,
    checkpoint_size_report,
    load_quantized,
    pack_codes,
    packed_row_bytes,
    save_quantized,
    unpack_codes,
)
from epmq.quant.result import QuantResult

try:  # the lead's quantizers, when present
    from epmq.quant.rounding import gptq as lead_gptq
    from epmq.quant.rounding import rtn as lead_rtn
except Exception:  # pragma: no cover - module still being written
    lead_rtn = lead_gptq = None


# --------------------------------------------------------------------------------------------- helpers


def rtn_result(w, bits, group_size=-1, sym=False, perm=None, refit_bias=None) -> QuantResult:
    """RTN on the shared grid; with ``perm`` the groups follow the permuted column order (act-order-like:
    consecutive columns need not share a group)."""
    w = w.detach().float()
    rows, cols = w.shape
    spec = GridSpec(bits, group_size, sym)
    order = torch.arange(cols) if perm is None else perm
    gs = cols if group_size == -1 else group_size
    G = spec.n_groups(cols)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[order] = (torch.arange(cols) // gs).to(torch.int32)
    scales = torch.empty(rows, G)
    zeros = torch.empty(rows, G)
    for g in range(G):
        s, z = find_params(w[:, order[g * gs : (g + 1) * gs]], spec)
        scales[:, g], zeros[:, g] = s, z
    S, Z = scales[:, g_idx.long()], zeros[:, g_idx.long()]
    codes = quantize_codes(w, S, Z, spec.maxq)
    return QuantResult(
        weight=dequantize(codes, S, Z),
        codes=codes.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        perm=None if perm is None else perm.to(torch.int64),
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=refit_bias,
    )


def apply_fake_quant(model: nn.Module, results: dict[str, QuantResult]) -> nn.Module:
    """A copy of ``model`` holding the fake-quant weights (and refitted biases)."""
    fq = copy.deepcopy(model)
    params = dict(fq.named_parameters())
    with torch.no_grad():
        for name, r in results.items():
            params[name].copy_(r.weight)
            if r.bias is not None:
                owner, _, leaf = name.rpartition(".")
                params[f"{owner}.{leaf[: -len('weight')]}bias"].copy_(r.bias)
    return fq


def reinit(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(37, 64)
        self.fc2 = nn.Linear(64, 19, bias=False)
        self.fc3 = nn.Linear(19, 8)
        self.norm = nn.LayerNorm(64)
        self.register_buffer("counter", torch.arange(3, dtype=torch.int64))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


class Block(nn.Module):
    """open_clip-like residual attention block."""

    def __init__(self, d=32, heads=4, batch_first=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def mlp_results(model: MLP) -> dict[str, QuantResult]:
    g = torch.Generator().manual_seed(1)
    return {
        "fc1.weight": rtn_result(model.fc1.weight, 3, group_size=8, perm=torch.randperm(37, generator=g)),
        "fc2.weight": rtn_result(model.fc2.weight, 4, group_size=16, sym=True),
        "fc3.weight": rtn_result(model.fc3.weight, 2, refit_bias=torch.randn(8, generator=g)),
    }


def block_results(block: Block) -> dict[str, QuantResult]:
    g = torch.Generator().manual_seed(2)
    d = block.attn.embed_dim
    return {
        "attn.in_proj_weight": rtn_result(
            block.attn.in_proj_weight,
            4,
            group_size=8,
            perm=torch.randperm(d, generator=g),
            refit_bias=torch.randn(3 * d, generator=g),
        ),
        "attn.out_proj.weight": rtn_result(block.attn.out_proj.weight, 5, group_size=16),
        "mlp.0.weight": rtn_result(block.mlp[0].weight, 8, group_size=-1),
        "mlp.2.weight": rtn_result(block.mlp[2].weight, 3, group_size=32, sym=True),
    }


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 3, 13, 37, 64])
def test_pack_roundtrip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 2**bits, (7, cols), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, packed_row_bytes(cols, bits))
    assert packed.shape[1] == -(-cols * bits // 8)
    out = unpack_codes(packed, bits, cols)
    assert out.dtype == torch.uint8 and torch.equal(out.to(torch.int32), codes)
    # float codes (as the grid functions return them) pack identically
    assert torch.equal(pack_codes(codes.float(), bits), packed)


def test_bit_order_lsb_first():
    # 3 bits: stream = 1 | 2<<3 | 3<<6 = 0b11_010_001 = 209, then a zero pad byte for code 4 = 0b100 at bit 9
    assert pack_codes(torch.tensor([[1, 2, 3, 4]]), 3).tolist() == [[209, 0b1000]]
    assert pack_codes(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 3]]), 2).tolist() == [[0b00_11_10_01, 0b11]]
    # 5 bits straddle bytes: 31 | 1<<5 -> byte0 = 0b001_11111, byte1 = 0
    assert pack_codes(torch.tensor([[31, 1]]), 5).tolist() == [[0b00111111, 0]]


def test_pack_rejects_bad_codes():
    with pytest.raises(EPMQError, match="outside"):
        pack_codes(torch.tensor([[0, 8]]), 3)
    with pytest.raises(EPMQError, match="outside"):
        pack_codes(torch.tensor([[-1, 0]]), 4)
    with pytest.raises(EPMQError, match="integers"):
        pack_codes(torch.tensor([[0.5, 1.0]]), 4)
    with pytest.raises(EPMQError, match="bits"):
        pack_codes(torch.tensor([[0, 1]]), 9)
    with pytest.raises(EPMQError, match="2-D"):
        pack_codes(torch.tensor([0, 1]), 4)
    with pytest.raises(EPMQError, match="bytes"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 7)


# -------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "bits,group_size,sym,act",
    [(2, -1, False, False), (3, 8, False, True), (4, 16, True, False), (5, 8, False, True), (8, -1, True, False)],
)
def test_quantlinear_bit_exact(bits, group_size, sym, act):
    g = torch.Generator().manual_seed(bits)
    lin = nn.Linear(29, 11)
    w = torch.randn(11, 29, generator=g)
    r = rtn_result(w, bits, group_size, sym, perm=torch.randperm(29, generator=g) if act else None)
    q = QuantLinear.from_result(r, lin.bias)
    assert q.qweight.dtype == torch.uint8 and q.zeros.dtype == torch.uint8 and q.g_idx.dtype == torch.int32
    assert q.scales.dtype == torch.float32 and (q.perm is not None) == act
    assert torch.equal(q.dequantize(), r.weight) and torch.equal(q.dequantize(), r.dequantize())
    x = torch.randn(5, 29, generator=g)
    with torch.no_grad():
        lin.weight.copy_(r.weight)
    assert torch.equal(q(x), lin(x))
    # .half() keeps scales float32 (exact), the weight follows the nominal dtype
    q.half()
    assert q.scales.dtype == torch.float32 and q.weight.dtype == torch.float16
    assert torch.equal(q.weight, r.weight.half())
    assert q(x.half()).dtype == torch.float16


def test_quantlinear_lead_quantizers():
    if lead_rtn is None:
        pytest.skip("epmq.quant.rounding not available")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g)
    X = torch.randn(40, 200, generator=g)
    for r in (lead_rtn(w, 4, group_size=8), lead_gptq(w, X @ X.T, 3, group_size=8, act_order=True)):
        q = QuantLinear.from_result(r, None)
        assert torch.equal(q.dequantize(), r.weight)
    assert r.perm is not None and q.perm is not None  # act-order result


def test_quantlinear_cache_and_verify():
    r = rtn_result(torch.randn(6, 10), 4)
    q = QuantLinear.from_result(r, None, cache_weight=True)
    x = torch.randn(2, 10)
    y1 = q(x)
    assert q._cache is not None and torch.equal(q(x), y1)
    bad = copy.copy(r)
    bad.weight = r.weight + 1e-3
    with pytest.raises(EPMQError, match="bit-exact"):
        QuantLinear.from_result(bad, None)


# --------------------------------------------------------------------------------------- round trips


def test_mlp_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    results = mlp_results(model)
    fq = apply_fake_quant(model, results)
    x = torch.randn(4, 37)
    ref = fq(x)

    sizes = save_quantized(model, results, tmp_path, config={"method": "rtn", "merge": "ties"})
    fresh = reinit(MLP(), seed=123).eval()
    loaded = load_quantized(fresh, tmp_path)
    assert isinstance(loaded.fc1, QuantLinear) and isinstance(loaded.fc2, QuantLinear)
    assert loaded.fc1.perm is not None and loaded.fc2.sym
    assert torch.equal(loaded(x), ref)
    assert torch.equal(loaded.fc3.bias, results["fc3.weight"].bias)  # refitted bias
    assert torch.equal(loaded.norm.weight, model.norm.weight) and torch.equal(loaded.counter, model.counter)
    # grad mode too
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)

    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 1 and cfg["packing"]["bit_order"] == "lsb_first"
    assert cfg["quantized_params"] == list(results) and cfg["config"]["method"] == "rtn"
    assert cfg["params"]["fc1.weight"]["bits"] == 3 and cfg["params"]["fc1.weight"]["act_order"]
    assert cfg["params"]["fc3.weight"]["bias_refit"]
    assert sizes == checkpoint_size_report(tmp_path)
    assert sizes["file_bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size
    code = sum(packed_row_bytes(r.weight.shape[1], r.bits) * r.weight.shape[0] for r in results.values())
    assert sizes["quantized_code_bytes"] == code


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_block_roundtrip(tmp_path, batch_first, monkeypatch):
    torch.manual_seed(1)
    block = Block(batch_first=batch_first).eval()
    results = block_results(block)
    fq = apply_fake_quant(block, results)
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)

    save_quantized(block, results, tmp_path, config={"method": "rtn"})
    loaded = load_quantized(reinit(Block(batch_first=batch_first), seed=7).eval(), tmp_path)
    assert isinstance(loaded.mlp[0], QuantLinear) and isinstance(loaded.mlp[2], QuantLinear)
    assert not isinstance(loaded.attn.out_proj, QuantLinear)  # MHA reads out_proj.weight directly
    assert torch.nn.utils.parametrize.is_parametrized(loaded.attn, "in_proj_weight")
    assert torch.nn.utils.parametrize.is_parametrized(loaded.attn.out_proj, "weight")
    assert torch.equal(loaded.attn.in_proj_weight, results["attn.in_proj_weight"].weight)
    assert torch.equal(loaded.attn.out_proj.weight, results["attn.out_proj.weight"].weight)
    assert torch.equal(loaded.attn.in_proj_bias, results["attn.in_proj_weight"].bias)

    # slow path (grad enabled: parameters require grad in both models). The weights are bit-exact (above); the
    # outputs agree up to float32 summation order: on some CPUs (seen on an AMD EPYC) the GEMM takes another
    # kernel for the dequantized buffer and the batch_first outputs differ in the last bit (3.6e-7)
    torch.testing.assert_close(loaded(x), fq(x), rtol=1e-6, atol=1e-6)
    # no_grad: batch_first=True takes MHA's fused fast path -- count it in both models
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    deq_calls = []
    orig = PackedParam.dequantize
    monkeypatch.setattr(PackedParam, "dequantize", lambda self: deq_calls.append(1) or orig(self))
    with torch.no_grad():
        y_loaded, y_ref = loaded(x), fq(x)
    assert torch.equal(y_loaded, y_ref)
    assert len(calls) == (2 if batch_first else 0)
    assert len(deq_calls) == 2  # in_proj + out_proj dequantized once each per forward (scope cache)
    assert loaded.attn.parametrizations.in_proj_weight[0]._cache is None  # dropped after the forward


def test_mha_half_and_state(tmp_path):
    torch.manual_seed(3)
    block = Block(batch_first=True).eval()
    results = block_results(block)
    save_quantized(block, results, tmp_path, config={})
    loaded = load_quantized(Block(batch_first=True).eval(), tmp_path)
    loaded.half()
    p = loaded.attn.parametrizations.in_proj_weight[0]
    assert p.scales.dtype == torch.float32
    assert loaded.attn.in_proj_weight.dtype == torch.float16
    assert torch.equal(loaded.attn.in_proj_weight, results["attn.in_proj_weight"].weight.half())
    with pytest.raises(EPMQError, match="assign"):
        loaded.attn.in_proj_weight = torch.zeros(96, 32, dtype=torch.float16)


def test_sizes_4bit(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    results = {
        "0.weight": rtn_result(model[0].weight, 4, group_size=64),
        "2.weight": rtn_result(model[2].weight, 4, group_size=64),
    }
    s = save_quantized(model, results, tmp_path, config={"method": "rtn"})
    assert s["params"]["0.weight"]["code_bytes"] == 128 * (256 * 4 // 8)
    assert s["params"]["2.weight"]["code_bytes"] == 64 * (128 * 4 // 8)
    fp16 = 2 * (128 * 256 + 64 * 128)
    assert s["quantized_fp16_bytes"] == fp16
    assert s["code_ratio"] == pytest.approx(4 / 16)
    # metadata: float32 scales + uint8 zeros per (row, group) + int32 g_idx per column
    meta = 128 * 4 * 5 + 64 * 2 * 5 + 4 * (256 + 128)
    assert s["quantized_meta_bytes"] == meta
    assert s["packed_ratio"] < 0.32
    other = 4 * (128 + 64)  # biases, float32
    assert s["other_bytes"] == other
    assert s["file_bytes"] == s["header_bytes"] + s["quantized_packed_bytes"] + other
    assert s["file_bytes"] < fp16 * 4 / 16 * 1.35 + other + 2048


def test_save_keeps_dtypes(tmp_path):
    model = MLP().half()
    results = mlp_results(model)
    save_quantized(model, results, tmp_path, config={})
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / WEIGHTS_FILE))
    assert t["fc1.bias"].dtype == torch.float16 and t["counter"].dtype == torch.int64
    assert t["fc3.bias"].dtype == torch.float32  # refitted bias stored in float32
    assert t["fc1.weight.perm"].dtype == torch.int64 and "fc2.weight.perm" not in t
    assert t["fc1.weight.qweight"].dtype == torch.uint8 and t["fc1.weight.g_idx"].dtype == torch.int32
    assert "fc1.weight" not in t
    loaded = load_quantized(MLP().half(), tmp_path)
    x = torch.randn(3, 37).half()
    assert torch.equal(loaded(x), apply_fake_quant(model, results)(x))


def test_added_bias_for_biasless_linear(tmp_path):
    model = MLP()
    results = mlp_results(model)
    results["fc2.weight"] = rtn_result(model.fc2.weight, 4, refit_bias=torch.randn(19))
    save_quantized(model, results, tmp_path, config={})
    loaded = load_quantized(MLP(), tmp_path)
    assert torch.equal(loaded.fc2.bias, results["fc2.weight"].bias)


# ------------------------------------------------------------------------------------------- failures


def _saved_mlp(tmp_path):
    model = MLP()
    save_quantized(model, mlp_results(model), tmp_path, config={})
    return model


def _rewrite(tmp_path, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / WEIGHTS_FILE)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    t = load_file(path)
    edit(t)
    save_file(t, path, metadata=meta)


def test_missing_key(tmp_path):
    _saved_mlp(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("fc1.weight.scales"))
    with pytest.raises(EPMQError, match=r"fc1\.weight\.scales"):
        load_quantized(MLP(), tmp_path)


def test_missing_plain_key(tmp_path):
    _saved_mlp(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("norm.bias"))
    with pytest.raises(EPMQError, match=r"missing.*norm\.bias"):
        load_quantized(MLP(), tmp_path)


def test_unexpected_key(tmp_path):
    _saved_mlp(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"extra.thing": torch.zeros(2)}))
    with pytest.raises(EPMQError, match=r"unexpected.*extra\.thing"):
        load_quantized(MLP(), tmp_path)


def test_packed_shape_mismatch(tmp_path):
    _saved_mlp(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"fc2.weight.qweight": t["fc2.weight.qweight"][:, :-1].contiguous()}))
    with pytest.raises(EPMQError, match=r"fc2\.weight\.qweight"):
        load_quantized(MLP(), tmp_path)


def test_g_idx_out_of_range(tmp_path):
    _saved_mlp(tmp_path)
    _rewrite(tmp_path, lambda t: t["fc1.weight.g_idx"].__setitem__(0, 99))
    with pytest.raises(EPMQError, match=r"fc1\.weight\.g_idx"):
        load_quantized(MLP(), tmp_path)


def test_architecture_mismatch(tmp_path):
    _saved_mlp(tmp_path)
    other = MLP()
    other.fc1 = nn.Linear(41, 64)  # different in_features
    with pytest.raises(EPMQError, match=r"fc1\.weight"):
        load_quantized(other, tmp_path)
    other = MLP()
    other.norm = nn.LayerNorm(65)
    with pytest.raises(EPMQError, match=r"norm\.weight"):
        load_quantized(other, tmp_path)


def test_bad_format_version(tmp_path):
    _saved_mlp(tmp_path)
    p = tmp_path / CONFIG_FILE
    cfg = json.loads(p.read_text())
    cfg["format_version"] = 99
    p.write_text(json.dumps(cfg))
    with pytest.raises(EPMQError, match=CONFIG_FILE + ".*format_version"):
        load_quantized(MLP(), tmp_path)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(EPMQError, match=CONFIG_FILE):
        load_quantized(MLP(), tmp_path)
    _saved_mlp(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EPMQError, match=WEIGHTS_FILE):
        load_quantized(MLP(), tmp_path)


def test_mismatched_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _saved_mlp(a)
    _saved_mlp(b)
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    with pytest.raises(EPMQError, match="checkpoint_id"):
        load_quantized(MLP(), a)


def test_save_errors(tmp_path):
    model = MLP()
    results = mlp_results(model)
    with pytest.raises(EPMQError, match="nope.weight"):
        save_quantized(model, {"nope.weight": results["fc1.weight"]}, tmp_path, config={})
    with pytest.raises(EPMQError, match=r"fc2\.weight"):
        save_quantized(model, {"fc2.weight": results["fc1.weight"]}, tmp_path, config={})
    bad = copy.copy(results["fc1.weight"])
    bad.weight = bad.weight * 1.0001
    with pytest.raises(EPMQError, match=r"fc1\.weight.*bit-exact"):
        save_quantized(model, {"fc1.weight": bad}, tmp_path, config={})
    with pytest.raises(EPMQError, match=r"config\['x'\]"):
        save_quantized(model, results, tmp_path, config={"x": object()})
    blk = Block()
    r = rtn_result(blk.attn.out_proj.weight, 4)
    nb = nn.MultiheadAttention(32, 4, bias=False)
    r.bias = torch.zeros(32)
    with pytest.raises(EPMQError, match="out_proj"):
        save_quantized(nb, {"out_proj.weight": r}, tmp_path, config={})
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # no temp files left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_roundtrip(tmp_path):
    torch.manual_seed(5)
    for bits in (2, 3, 4, 5, 8):
        codes = torch.randint(0, 2**bits, (9, 37), device="cuda")
        p = pack_codes(codes, bits)
        assert torch.equal(p.cpu(), pack_codes(codes.cpu(), bits))
        assert torch.equal(unpack_codes(p, bits, 37).long(), codes)
    block = Block(batch_first=True).eval()
    results = block_results(block)
    save_quantized(block, results, tmp_path, config={})
    fq = apply_fake_quant(block, results).cuda()
    loaded = load_quantized(Block(batch_first=True).cuda().eval(), tmp_path)
    assert loaded.mlp[0].qweight.is_cuda and loaded.attn.parametrizations.in_proj_weight[0].qweight.is_cuda
    x = torch.randn(2, 5, 32, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(x), fq(x))
    assert torch.equal(loaded.attn.in_proj_weight.cpu(), results["attn.in_proj_weight"].weight)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_row_chunks(bits, monkeypatch):
    import epmq.quant.packed as packed_mod

    codes = torch.randint(0, 2**bits, (11, 13))
    full = pack_codes(codes, bits)
    monkeypatch.setattr(packed_mod, "_CHUNK_ELEMS", 40)  # a few rows per chunk
    assert torch.equal(pack_codes(codes, bits), full)
    assert torch.equal(unpack_codes(full, bits, 13).long(), codes)


def test_roundtrip_lead_gptq_act_order(tmp_path):
    if lead_gptq is None:
        pytest.skip("epmq.quant.rounding not available")
    torch.manual_seed(6)
    model = MLP().eval()
    X = torch.randn(64, 37)
    H1 = X.T @ X
    h = torch.relu(model.fc1(X)).detach()
    results = {
        "fc1.weight": lead_gptq(model.fc1.weight.detach(), H1, 4, group_size=8, act_order=True),
        "fc2.weight": lead_rtn(model.fc2.weight.detach(), 3, group_size=16),
    }
    assert results["fc1.weight"].perm is not None
    assert h.shape == (64, 64)
    save_quantized(model, results, tmp_path, config={"method": "gptq"})
    loaded = load_quantized(reinit(MLP(), 9).eval(), tmp_path)
    x = torch.randn(3, 37)
    assert torch.equal(loaded(x), apply_fake_quant(model, results)(x))
