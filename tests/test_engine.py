"""The layer-wise calibration engine (:mod:`epmq.engine`) on tiny open_clip ViT, HF CLIP vision, BERT and T5
(encoder-decoder) models with 3 experts."""

import copy
import re

import pytest
import torch

import epmq.engine.budget as budget
import epmq.engine.fold as fold
from epmq.engine import QuantConfig, collect_stats, quantize_model
from epmq.engine.reuse import Reuse
from epmq.engine.runner import Engine
from epmq.quant.target import TaskStats
from epmq.errors import EPMQError
from epmq.models.adapters import get_adapter
from epmq.models.openclip import tiny_vision_transformer

T = 3


def _perturbed(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    e = copy.deepcopy(model)
    with torch.no_grad():
        for p in e.parameters():
            p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    return e


def _task_arithmetic(base, experts, lam):
    merged = copy.deepcopy(base)
    with torch.no_grad():
        sd = merged.state_dict()
        for k in sd:
            if sd[k].is_floating_point():
                sd[k].add_(lam * sum(e.state_dict()[k] - base.state_dict()[k] for e in experts))
    return merged


def _vit():
    torch.manual_seed(0)
    return tiny_vision_transformer(width=32, layers=2, heads=2).eval()


def _image_tasks(n_batches=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each task its own input distribution (a fixed mean image and contrast); ``seed`` draws the samples
    means = [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(100 + t)) for t in range(T)]
    return [
        [torch.randn(bs, 3, 28, 28, generator=g) * (0.5 + t) + means[t] for _ in range(n_batches)] for t in range(T)
    ]


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def _text_tasks(n_batches=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        batches = []
        for _ in range(n_batches):
            ids = torch.randint(30 * t, 30 * t + 40, (bs, 12), generator=g)  # each task its own vocabulary
            mask = torch.ones_like(ids)
            mask[: bs // 2, 9:] = 0  # padding, so attention masks matter
            batches.append({"input_ids": ids, "attention_mask": mask})
        tasks.append(batches)
    return tasks


def _hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=4, num_channels=3,
    )
    return CLIPVisionModel(cfg).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _t5_tasks(n_batches=2, bs=8, seed=0):
    """Teacher-forcing batches: each task its own input vocabulary, 10-token targets, padding on both sides."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        batches = []
        for _ in range(n_batches):
            ids = torch.randint(2 + 20 * t, 22 + 20 * t, (bs, 10), generator=g)
            mask = torch.ones_like(ids)
            mask[: bs // 2, 7:] = 0
            labels = torch.randint(2, 64, (bs, 10), generator=g)
            labels[: bs // 3, 7:] = -100
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        tasks.append(batches)
    return tasks


def _output(model, batch):
    out = get_adapter(model).run(model, batch)
    if hasattr(out, "logits"):  # T5: the LM logits
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _expert_error(model, experts, tasks):
    with torch.no_grad():
        return sum(
            float(((_output(model, b) - _output(e, b)) ** 2).mean()) for e, batches in zip(experts, tasks) for b in batches
        )


SUITES = {
    "openclip": (_vit, _image_tasks, 16),  # 2 blocks x (in_proj, out_proj, c_fc, c_proj) = 8 weights
    "bert": (_bert, _text_tasks, 12),
    "hf_clip": (_hf_clip, _image_tasks, 12),
    # per encoder block q k v o wi_0 wi_1 wo, per decoder block + cross-attention q k v o
    "t5": (_t5, _t5_tasks, 36),
}
EXPECTED_SITES = {"openclip": 8, "bert": 12, "hf_clip": 12, "t5": 2 * 7 + 2 * 11}
#: GPTQ calls saved per model by rounding same-input sites together: q/k/v (-2 per attention), T5's gated
#: wi_0/wi_1 (-1 per block) and cross-attention k/v (-1 per decoder block)
SHARED_SAVINGS = {"openclip": 0, "bert": 4, "hf_clip": 4, "t5": 2 * 3 + 2 * 4}


@pytest.fixture(scope="module", params=sorted(SUITES))
def setting(request):
    build, tasks, _ = SUITES[request.param]
    base = build()
    experts = [_perturbed(base, 0.3, seed=10 + t) for t in range(T)]
    merged = _task_arithmetic(base, experts, 0.3)
    return request.param, merged, experts, tasks(seed=0), tasks(seed=1)


@pytest.mark.parametrize("method", ["rtn", "gptq", "epmq"])
def test_quantizes_every_intended_weight_and_nothing_else(setting, method):
    name, merged, experts, calib, _ = setting
    model = copy.deepcopy(merged)
    report = quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False)
    assert len(report.results) == EXPECTED_SITES[name]
    sd_before, sd_after = merged.state_dict(), model.state_dict()
    changed = {k for k in sd_before if not torch.equal(sd_before[k], sd_after[k])}
    assert changed == set(report.results)  # biases untouched without fit_bias; LN/embeddings untouched
    for k, r in report.results.items():
        assert torch.equal(sd_after[k].float(), r.weight)
        assert r.codes.max() <= 7


def test_epmq_beats_gptq_against_experts(setting):
    name, merged, experts, calib, held_out = setting
    errs = {}
    for method in ("gptq", "epmq"):
        model = copy.deepcopy(merged)
        quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False)
        errs[method] = _expert_error(model, experts, held_out)
    errs["merged"] = _expert_error(merged, experts, held_out)
    assert errs["epmq"] < errs["gptq"], errs


def test_ablations_and_bias_refit(setting):
    name, merged, experts, calib, held_out = setting
    errs = {}
    for method in ("epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian"):
        model = copy.deepcopy(merged)
        report = quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False)
        errs[method] = _expert_error(model, experts, held_out)
        assert (len(report.results) == 0) == (method == "epmq_unrounded")
    # the unrounded expert-guided target repairs merging deviation: closer to the experts than the FP merge
    assert errs["epmq_unrounded"] < _expert_error(merged, experts, held_out)
    model = copy.deepcopy(merged)
    report = quantize_model(model, calib, QuantConfig(method="epmq", bits=3, fit_bias=True), experts=experts, progress=False)
    if name == "t5":  # bias-free Linears: nothing to refit, the architecture stays as it is
        assert not report.biases and all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    else:
        assert report.biases and all(torch.isfinite(b).all() for b in report.biases.values())


def test_fp_stats_are_collected_once_and_reused(setting):
    """``fp`` propagation: statistics from :func:`collect_stats` passed as ``stats=`` give the codes of a run
    that collects them itself, and serve another bit width and method without recollecting."""
    name, merged, experts, calib, _ = setting
    stats = collect_stats(merged, calib, experts, progress=False)
    cfg = QuantConfig(method="epmq", bits=4, propagation="fp")
    given = quantize_model(copy.deepcopy(merged), None, cfg, experts=experts, stats=stats, progress=False)
    own = quantize_model(copy.deepcopy(merged), calib, cfg, experts=experts, progress=False)
    assert given.results.keys() == own.results.keys()
    for k in given.results:
        assert torch.equal(given.results[k].codes, own.results[k].codes), k
    model = copy.deepcopy(merged)
    r = quantize_model(model, None, QuantConfig(method="gptq", bits=2, propagation="fp"), stats=stats, progress=False)
    assert len(r.results) == EXPECTED_SITES[name]


def test_engine_import_is_light_and_the_old_name_still_works():
    """``import epmq.engine`` loads no torch (each public name loads its module on first use), and the old
    module name ``epmq.calibrate`` hands out the same objects."""
    import subprocess
    import sys

    code = "import sys, epmq.engine, epmq.calibrate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import epmq.calibrate
    import epmq.engine

    for name in epmq.calibrate.__all__:
        assert getattr(epmq.calibrate, name) is getattr(epmq.engine, name), name
    assert set(epmq.engine.__all__) <= set(dir(epmq.engine))


def test_deterministic(setting):
    name, merged, experts, calib, _ = setting
    out = []
    for _ in range(2):
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, calib, QuantConfig(method="epmq", bits=3), experts=experts, progress=False))
    for k in out[0].results:
        assert torch.equal(out[0].results[k].weight, out[1].results[k].weight)


def test_bad_experts():
    merged = _vit()
    calib = _image_tasks()
    experts = [copy.deepcopy(merged).state_dict() for _ in range(T)]
    missing = dict(experts[1])
    del missing["transformer.resblocks.1.mlp.c_fc.weight"]
    with pytest.raises(EPMQError, match="expert 1: missing key 'transformer.resblocks.1.mlp.c_fc.weight'"):
        quantize_model(copy.deepcopy(merged), calib, QuantConfig(), experts=[experts[0], missing, experts[2]], progress=False)
    wrong = dict(experts[2])
    wrong["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    with pytest.raises(EPMQError, match="expert 2: 'transformer.resblocks.0.attn.in_proj_weight' has shape"):
        quantize_model(copy.deepcopy(merged), calib, QuantConfig(), experts=[experts[0], experts[1], wrong], progress=False)
    with pytest.raises(EPMQError, match="2 experts but 3 calibration tasks"):
        quantize_model(copy.deepcopy(merged), calib, QuantConfig(), experts=experts[:2], progress=False)
    bad = [[b.clone() for b in task] for task in calib]
    bad[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(EPMQError, match="NaN"):
        quantize_model(copy.deepcopy(merged), bad, QuantConfig(method="gptq"), progress=False)


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_engine_shortcuts_change_nothing(setting, method, monkeypatch):
    """Capturing each expert block once (``expert_pass``) and stopping a group's forward once its inputs are
    captured compute the same statistics as re-running the expert block for every group (up to float
    summation order inside BLAS: layer errors agree to 1e-5, codes in >= 99.9% of weights)."""
    name, merged, experts, calib, _ = setting
    out = []
    for mb in (budget.EXPERT_CACHE_MB, 0):  # 0: the cache never fits -> recompute per group
        monkeypatch.setattr(budget, "EXPERT_CACHE_MB", mb)
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False))
    for k in out[0].results:
        same = (out[0].results[k].codes == out[1].results[k].codes).float().mean()
        assert same >= 0.999, (k, float(same))
    for a, b in zip(out[0].layers, out[1].layers):
        assert a["rel_err_merged"] == pytest.approx(b["rel_err_merged"], rel=1e-5, abs=1e-9), a["layer"]


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_reused_outputs_change_nothing(setting, method, monkeypatch):
    """Reading a finished sub-module's output in a block's later passes (``Reuse``) gives bit-identical
    weights, and it does happen on every architecture (attention is not recomputed for the FFN's groups)."""
    name, merged, experts, calib, _ = setting
    hits = []
    close = Reuse.close
    monkeypatch.setattr(Reuse, "close", lambda self: hits.append(self.hits) or close(self))
    out = []
    for mb in (0, budget.REUSE_CACHE_MB):  # 0: no reuse, every pass recomputes the block
        monkeypatch.setattr(budget, "REUSE_CACHE_MB", mb)
        model = copy.deepcopy(merged)
        rep = quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False)
        out.append((rep, model.state_dict()))
    n_blocks = sum(len(stack) for stack in get_adapter(merged).find_stacks(merged))
    assert len(hits) == n_blocks and all(h > 0 for h in hits), hits
    (ra, sa), (rb, sb) = out
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(ra.results[k].codes, rb.results[k].codes) for k in ra.results)
    # nothing of the wrapping survives the run
    assert not any("forward" in m.__dict__ for m in merged.modules())


def test_direct_target_products_change_little(setting, monkeypatch):
    """The layers whose E-PMQ target product is formed token by token (``direct_pays``: an MLP's down
    projection on every architecture) give what the C-and-fold route gives, up to float32 summation order:
    layer errors to 1e-4, codes in >= 99% of the weights."""
    name, merged, experts, calib, _ = setting
    used = []
    pays = fold.direct_pays
    monkeypatch.setattr(fold, "direct_pays", lambda o, i: used.append((o, i)) or pays(o, i))
    direct = quantize_model(copy.deepcopy(merged), calib, QuantConfig(method="epmq", bits=3), experts=experts,
                            progress=False)
    assert any(pays(o, i) for o, i in used), used
    monkeypatch.setattr(fold, "direct_pays", lambda o, i: False)
    folded = quantize_model(copy.deepcopy(merged), calib, QuantConfig(method="epmq", bits=3), experts=experts,
                            progress=False)
    for k in direct.results:
        same = (direct.results[k].codes == folded.results[k].codes).float().mean()
        assert same >= 0.99, (k, float(same))
    for a, b in zip(direct.layers, folded.layers):
        assert a["epmq_objective"] == pytest.approx(b["epmq_objective"], rel=1e-4), a["layer"]


def test_cached_expert_outputs_give_the_same_bits(setting, monkeypatch):
    """The expert pass keeping a down projection's expert outputs instead of its inputs (a quarter of the
    memory in a ViT) changes no bit of the result, and does happen on every architecture."""
    name, merged, experts, calib, _ = setting
    expert_pass = Engine.expert_pass
    kept = []

    def run(want: bool):
        def spy(self, idx, streams, outputs=False):
            r = expert_pass(self, idx, streams, outputs=outputs and want)
            kept.extend(k for caps in (r or []) for call in caps for k in call)
            return r

        monkeypatch.setattr(Engine, "expert_pass", spy)
        model = copy.deepcopy(merged)
        rep = quantize_model(model, calib, QuantConfig(method="epmq", bits=3), experts=experts, progress=False)
        return rep, model.state_dict()

    (ra, sa), n_plain = run(False), len(kept)
    assert not any(isinstance(k, tuple) for k in kept)
    rb, sb = run(True)
    assert any(isinstance(k, tuple) and k[0] == "out" for k in kept[n_plain:]), "no expert outputs were cached"
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(ra.results[k].codes, rb.results[k].codes) for k in ra.results)


def test_cache_budgets_from_the_environment(setting, monkeypatch):
    """EPMQ_EXPERT_CACHE_MB / EPMQ_REUSE_CACHE_MB override the engine's budgets (0 turns the cache off), and a
    bad value is a clear error naming the variable."""
    for name in ("EXPERT_CACHE_MB", "REUSE_CACHE_MB"):
        monkeypatch.delenv(f"EPMQ_{name}", raising=False)
        assert budget.cache_budget_mb(name) == getattr(budget, name)
        monkeypatch.setenv(f"EPMQ_{name}", "512")
        assert budget.cache_budget_mb(name) == 512
        for bad in ("lots", "-5", "1.5"):
            monkeypatch.setenv(f"EPMQ_{name}", bad)
            with pytest.raises(EPMQError, match=f"EPMQ_{name}='{re.escape(bad)}': expected a whole number"):
                budget.cache_budget_mb(name)
    with pytest.raises(EPMQError, match="cache budget 'OTHER_MB': expected 'EXPERT_CACHE_MB' or 'REUSE_CACHE_MB'"):
        budget.cache_budget_mb("OTHER_MB")
    name, merged, experts, calib, _ = setting
    passes, reuses = [], []
    expert_pass, close = Engine.expert_pass, Reuse.close
    monkeypatch.setattr(Engine, "expert_pass",
                        lambda self, *a, **k: passes.append(expert_pass(self, *a, **k)) or passes[-1])
    monkeypatch.setattr(Reuse, "close", lambda self: reuses.append(self) or close(self))
    monkeypatch.setenv("EPMQ_EXPERT_CACHE_MB", "0")
    monkeypatch.setenv("EPMQ_REUSE_CACHE_MB", "0")
    quantize_model(copy.deepcopy(merged), calib, QuantConfig(method="epmq", bits=3), experts=experts, progress=False)
    assert passes and all(p is None for p in passes) and not reuses


def test_lazy_experts_are_read_block_by_block(setting):
    """Lazy experts: the first block's inputs need only each expert's stem, so a block tensor is read when the
    engine gets to its block (and a rounded weight once more, for the target fold), never a third time (T5's
    decoder inputs need whole experts: not counted)."""
    from collections import Counter
    from collections.abc import Mapping

    name, merged, experts, calib, _ = setting

    class Counting(Mapping):
        def __init__(self, sd):
            self.sd, self.reads = sd, Counter()

        def __getitem__(self, k):
            self.reads[k] += 1
            return self.sd[k]

        def __iter__(self):
            return iter(self.sd)

        def __len__(self):
            return len(self.sd)

    lazy = [Counting(e.state_dict()) for e in experts]
    quantize_model(copy.deepcopy(merged), calib, QuantConfig(method="epmq", bits=3), experts=lazy, progress=False)
    adapter = get_adapter(merged)
    blocks = tuple(p for stack in adapter.find_stacks(merged) for p, _ in stack)
    for e in lazy:
        assert all(e.reads[k] >= 1 for k in e.sd if k.startswith(blocks)), "a block tensor was never read"
        if name != "t5":
            assert max(e.reads.values()) <= 2, e.reads.most_common(3)
            assert all(n == 1 for k, n in e.reads.items() if not k.startswith(blocks)), e.reads


class _Toy(torch.nn.Module):
    """a -> (in-place x2) -> d -> b twice (shared) -> c."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.d, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)  # in place on a's output after it returned: a kept a-output must not be read
        return self.c(self.b(self.b(self.d(h))))


def test_reuse_tracks_writes_shared_modules_and_in_place_ops():
    from epmq.models.adapters import _linear

    block = _Toy()
    sites = {p: _linear(block, p, p) for p in ("a", "d", "b", "c")}
    x = torch.randn(3, 4)
    reuse = Reuse(block, list(sites.values()))
    try:
        with torch.no_grad():
            with reuse.calling(0):
                block(x)  # nothing written yet: nothing kept
            assert reuse.kept == {}
            for p in ("a", "d"):
                getattr(block, p).weight.data.mul_(0.5)  # (the write itself; reuse only needs to be told)
                reuse.wrote(sites[p])
            with reuse.calling(0):
                first = block(x)
            assert set(reuse.kept) == {(id(block.a), 0), (id(block.d), 0)}  # b is called twice: never kept
            assert id(block.b) in reuse.shared
            with reuse.calling(0):
                again = block(x)
            # a's output was doubled in place after it returned: recomputed, not read; d's read
            assert reuse.hits == 1 and torch.equal(first, again)
            with reuse.calling(1):  # another input key: computed, not read
                other = block(x + 1)
            assert reuse.hits == 1 and not torch.equal(other, first)
            # a write upstream of a kept output forgets it; the next pass recomputes with the new weight
            block.a.weight.data.mul_(2.0)
            reuse.wrote(sites["a"])
            assert reuse.kept == {}
            with reuse.calling(0):
                fresh = block(x)
        reuse.close()
        plain = block(x)
        assert torch.equal(fresh, plain) and not torch.equal(fresh, first)
        assert "forward" not in block.a.__dict__ and not block.a._forward_pre_hooks
    finally:
        reuse.close()


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_shared_hessians_change_nothing(setting, method, monkeypatch):
    """q/k/v (same input, same Hessian) rounded in one stacked GPTQ call give the codes of separate calls
    (up to float rounding in the lazy block update) and fewer GPTQ calls when the model has such sites."""
    import epmq.quant.methods.base as B
    import epmq.quant.rounding as R

    name, merged, experts, calib, _ = setting
    calls, inside = [], []  # the quantizer's GPTQ calls (gptq_shared's own inner gptq call not counted)
    real_gptq, real_shared = R.gptq, R.gptq_shared

    def counted_shared(*a, **k):
        calls.append(k.get("name"))
        inside.append(True)
        try:
            return real_shared(*a, **k)
        finally:
            inside.pop()

    def counted_gptq(*a, **k):
        if not inside:
            calls.append(k.get("name"))
        return real_gptq(*a, **k)

    monkeypatch.setattr(R, "gptq", counted_gptq)
    monkeypatch.setattr(R, "gptq_shared", counted_shared)
    out, n_calls = [], []
    for share in (True, False):
        monkeypatch.setattr(B, "SHARE_HESSIANS", share)
        calls.clear()
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, calib, QuantConfig(method=method, bits=3), experts=experts, progress=False))
        n_calls.append(len(calls))
    assert out[0].results.keys() == out[1].results.keys()
    for k in out[0].results:
        same = (out[0].results[k].codes == out[1].results[k].codes).float().mean()
        assert same >= 0.999, (k, float(same))
    for a, b in zip(out[0].layers, out[1].layers):
        assert a["rel_err_merged"] == pytest.approx(b["rel_err_merged"], rel=1e-4, abs=1e-9), a["layer"]
    assert n_calls[1] == len(out[1].results)
    # openclip: q/k/v fused into one in_proj, nothing to share; else q/k/v: one call instead of three, per block
    assert n_calls[0] == n_calls[1] - SHARED_SAVINGS[name]


def test_bf16_forwards_close_to_fp32(setting):
    """``forward_dtype='bf16'`` (autocast block forwards, float32 statistics) changes the layer error relative
    to the fp32 path by little, and rejects unknown dtypes."""
    name, merged, experts, calib, _ = setting
    rel = {}
    for dt in ("fp32", "bf16"):
        model = copy.deepcopy(merged)
        rep = quantize_model(model, calib, QuantConfig(method="epmq", bits=4, forward_dtype=dt), experts=experts,
                             progress=False)
        rel[dt] = {r["layer"]: r["rel_err_merged"] for r in rep.layers}
    for layer, e in rel["fp32"].items():
        assert abs(rel["bf16"][layer] - e) <= 0.1 * e + 1e-4, (layer, e, rel["bf16"][layer])
    with pytest.raises(EPMQError, match="forward_dtype='int8'"):
        QuantConfig(forward_dtype="int8")


def _spy_stored_hidden(monkeypatch):
    """Record, after every engine step that sets the kept block calls (first capture, a later stack's capture,
    the expert pass, propagation), the dtypes and total bytes of the hidden states kept between blocks."""
    seen = {"dtypes": set(), "peak_bytes": 0}

    def record(streams):
        total = 0
        for calls in [*streams.model, *(streams.expert or [])]:
            for c in calls:
                seen["dtypes"].add(c.hidden.dtype)
                total += c.hidden.numel() * c.hidden.element_size()
        seen["peak_bytes"] = max(seen["peak_bytes"], total)

    real = {k: getattr(Engine, k) for k in ("streams", "enter_stack", "expert_pass", "propagate")}

    def streams(self):
        out = real["streams"](self)
        record(out)
        return out

    def enter_stack(self, idx, streams, with_expert):
        real["enter_stack"](self, idx, streams, with_expert)
        record(streams)

    def expert_pass(self, idx, streams, **kw):
        out = real["expert_pass"](self, idx, streams, **kw)
        record(streams)
        return out

    def propagate(self, idx, streams, with_expert, reuse=None):
        real["propagate"](self, idx, streams, with_expert, reuse)
        record(streams)

    for k, f in (("streams", streams), ("enter_stack", enter_stack), ("expert_pass", expert_pass),
                 ("propagate", propagate)):
        monkeypatch.setattr(Engine, k, f)
    return seen


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_act_dtype_stores_half_precision_hidden_states(setting, act, monkeypatch):
    """``act_dtype`` bf16/fp16 keeps the propagated hidden states (the quantized model's and every expert's) in
    that dtype between blocks, half the bytes of fp32, and moves little: measured on these models (4 bits),
    layer errors within 6.4% of the fp32 run (mean over layers within 1.1%), GPTQ weights within 6% (relative
    Frobenius). Tolerances: 10% per layer (as for forward_dtype), 3% on the mean, 15% on GPTQ weights. E-PMQ's
    weights move ~20% on these tiny calibration sets whichever precision changes (forward_dtype=bf16 too):
    its target is sensitive here, so only its layer errors are compared."""
    name, merged, experts, calib, _ = setting
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[act]
    for method in ("gptq", "epmq"):
        reps, seen = {}, {}
        for dt in ("fp32", act):
            spy = _spy_stored_hidden(monkeypatch)
            model = copy.deepcopy(merged)
            reps[dt] = quantize_model(model, calib, QuantConfig(method=method, bits=4, act_dtype=dt), experts=experts,
                                      progress=False)
            seen[dt] = dict(spy)
            monkeypatch.undo()
        assert seen["fp32"]["dtypes"] == {torch.float32}, seen["fp32"]
        assert seen[act]["dtypes"] == {want}, seen[act]
        assert seen[act]["peak_bytes"] * 2 == seen["fp32"]["peak_bytes"] > 0
        ref = {r["layer"]: r["rel_err_merged"] for r in reps["fp32"].layers}
        got = {r["layer"]: r["rel_err_merged"] for r in reps[act].layers}
        assert got.keys() == ref.keys()
        for layer, e in ref.items():
            assert abs(got[layer] - e) <= 0.1 * e + 1e-4, (method, layer, e, got[layer])
        mean_ref, mean_got = sum(ref.values()) / len(ref), sum(got.values()) / len(got)
        assert abs(mean_got - mean_ref) <= 0.03 * mean_ref, (method, mean_ref, mean_got)
        if method == "gptq":
            for k, r in reps["fp32"].results.items():
                q = reps[act].results[k].weight
                assert float((q - r.weight).norm() / r.weight.norm()) <= 0.15, k


def test_act_dtype_fp32_is_the_default(setting):
    """``act_dtype='fp32'`` is the path without the knob: bit-identical weights and layer errors."""
    name, merged, experts, calib, _ = setting
    out = []
    for cfg in (QuantConfig(method="epmq", bits=3), QuantConfig(method="epmq", bits=3, act_dtype="fp32")):
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, calib, cfg, experts=experts, progress=False))
    assert out[0].results.keys() == out[1].results.keys()
    for k in out[0].results:
        assert torch.equal(out[0].results[k].weight, out[1].results[k].weight), k
    for a, b in zip(out[0].layers, out[1].layers):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_act_dtype_in_fp_statistics(monkeypatch):
    """``fp`` propagation (:func:`collect_stats`) keeps its hidden states in ``act_dtype`` too; the float32
    statistics stay close (measured here: G and C within 0.06% relative Frobenius, T5's up to 0.4%;
    tolerance 1%)."""
    merged = _vit()
    experts = [_perturbed(merged, 0.3, seed=10 + t) for t in range(T)]
    calib = _image_tasks()
    ref = collect_stats(merged, calib, experts, progress=False)
    spy = _spy_stored_hidden(monkeypatch)
    got = collect_stats(merged, calib, experts, progress=False, act_dtype="bf16")
    assert spy["dtypes"] == {torch.bfloat16}
    for k in ref:
        for a, b in zip(ref[k], got[k]):
            assert b.G.dtype == b.C.dtype == torch.float32
            assert float((a.G - b.G).norm() / a.G.norm()) <= 0.01, k
            assert float((a.C - b.C).norm() / a.C.norm()) <= 0.01, k


def test_bad_act_dtype():
    with pytest.raises(EPMQError, match="act_dtype='int8'"):
        QuantConfig(act_dtype="int8")
    with pytest.raises(EPMQError, match="act_dtype='float16'"):
        collect_stats(_vit(), _image_tasks(), progress=False, act_dtype="float16")


def test_stats_dtype_bf16_is_the_gram_of_the_rounded_inputs():
    """``stats_dtype='bf16'``: G and C are the float32-accumulated products of the bf16-rounded layer inputs
    (checked against float64 products of those rounded values: the bf16 hardware path, where the CPU has one,
    must not round the sums), and differ from the float32 statistics only by that input rounding."""
    merged = _vit()
    experts = [_perturbed(merged, 0.3, seed=10 + t) for t in range(T)]
    calib = _image_tasks()
    captured = []
    real_add = TaskStats.add

    def spy(self, x, x_expert=None, *, name="inputs", **kw):
        if self.round_to is not None:
            captured.append((self, x.detach().clone(), x_expert.detach().clone()))
        return real_add(self, x, x_expert, name=name, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(TaskStats, "add", spy)
    try:
        got = collect_stats(merged, calib, experts, progress=False, stats_dtype="bf16")
    finally:
        mp.undo()
    ref = collect_stats(merged, calib, experts, progress=False)
    for stats, x, xe in captured[:6]:
        def aug(t):
            t = t.reshape(-1, t.shape[-1]).to(torch.bfloat16).double()
            return torch.cat([t, torch.ones(t.shape[0], 1, dtype=torch.float64)], 1)
        one = TaskStats(x.shape[-1], stats_dtype="bf16")
        one.add(x, xe)
        a, e = aug(x), aug(xe)
        for mine, exact in ((one.G, a.T @ a), (one.C, e.T @ a)):
            assert mine.dtype == torch.float32
            assert float((mine.double() - exact).abs().max() / exact.abs().max()) < 1e-6
    assert captured
    for k in ref:
        for r, b in zip(ref[k], got[k]):
            assert b.G.dtype == torch.float32 and not torch.equal(r.G, b.G), k  # rounded: not the fp32 numbers
            assert float((r.G - b.G).norm() / r.G.norm()) <= 0.01, k
            assert float((r.C - b.C).norm() / r.C.norm()) <= 0.01, k


def test_stats_dtype_fp32_is_the_default(setting):
    """``stats_dtype='fp32'`` is the path without the knob (bit-identical); bf16 stays close on E-PMQ."""
    name, merged, experts, calib, _ = setting
    out = []
    for cfg in (QuantConfig(method="epmq", bits=4), QuantConfig(method="epmq", bits=4, stats_dtype="fp32"),
                QuantConfig(method="epmq", bits=4, stats_dtype="bf16")):
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, calib, cfg, experts=experts, progress=False))
    for k in out[0].results:
        assert torch.equal(out[0].results[k].weight, out[1].results[k].weight), k
    ref = [r["rel_err_merged"] for r in out[0].layers]
    got = [r["rel_err_merged"] for r in out[2].layers]
    assert abs(sum(got) - sum(ref)) <= 0.03 * sum(ref), (sum(ref), sum(got))


def test_bad_stats_dtype():
    with pytest.raises(EPMQError, match="stats_dtype='fp16'"):
        QuantConfig(stats_dtype="fp16")
    with pytest.raises(EPMQError, match="stats_dtype='half'"):
        TaskStats(8, stats_dtype="half")


def test_padding_positions_do_not_enter_the_statistics():
    """Text batches carry padding; the statistics use real tokens only, so changing what sits at the padded
    positions changes nothing (before masking, the pads' hidden states entered every Gram matrix)."""
    base = _bert()
    experts = [_perturbed(base, 0.3, seed=10 + t) for t in range(T)]
    merged = _task_arithmetic(base, experts, 0.3)
    calib = _text_tasks(seed=0)
    g = torch.Generator().manual_seed(5)
    other = [[{"input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"],
                                        torch.randint(0, 100, b["input_ids"].shape, generator=g)),
               "attention_mask": b["attention_mask"]} for b in task] for task in calib]
    out = []
    for batches in (calib, other):
        model = copy.deepcopy(merged)
        out.append(quantize_model(model, batches, QuantConfig(method="epmq", bits=3), experts=experts, progress=False))
    for k in out[0].results:
        assert (out[0].results[k].codes == out[1].results[k].codes).float().mean() >= 0.999, k
    for a, b in zip(out[0].layers, out[1].layers):
        assert a["rel_err_merged"] == pytest.approx(b["rel_err_merged"], rel=1e-4), a["layer"]


def test_no_autograd_graph_survives_quantization(setting):
    """Calibration forwards run without autograd: a graph kept alive through the propagated hidden states
    would hold every block's activations (it once tripled E-PMQ's peak memory)."""
    name, merged, experts, calib, _ = setting
    seen = []
    real = Engine.expert_pass

    def spy(self, idx, streams, **kw):
        out = real(self, idx, streams, **kw)
        seen.extend(c.hidden.requires_grad for calls in streams.expert for c in calls)
        return out

    Engine.expert_pass = spy
    try:
        quantize_model(copy.deepcopy(merged), calib, QuantConfig(method="epmq", bits=3), experts=experts, progress=False)
    finally:
        Engine.expert_pass = real
    assert seen and not any(seen)


def test_shared_gptq_results_pack_and_reload(setting, tmp_path):
    """Results of a stacked (shared-Hessian) GPTQ call own their tensors, so the packed checkpoint saves and
    reloads bit-exactly."""
    from epmq.quant.packed import load_quantized, save_quantized

    name, merged, experts, calib, _ = setting
    model = copy.deepcopy(merged)
    rep = quantize_model(model, calib, QuantConfig(method="gptq", bits=3), progress=False)
    save_quantized(model, rep.results, tmp_path, config={"method": "gptq"})
    back = load_quantized(copy.deepcopy(merged), tmp_path).eval()
    for k, r in rep.results.items():  # every packed layer dequantizes to the fake-quant weight
        mod, attr = k.rsplit(".", 1)
        assert torch.equal(getattr(back.get_submodule(mod), attr).float(), r.weight), k


def test_report_results_share_the_layer_weight(setting):
    """No second copy of every quantized weight: a result's fake-quant weight is the layer's own tensor."""
    name, merged, experts, calib, _ = setting
    model = copy.deepcopy(merged)
    rep = quantize_model(model, calib, QuantConfig(method="gptq", bits=3), progress=False)
    sd = model.state_dict()
    assert rep.results
    for k, res in rep.results.items():
        assert res.weight.data_ptr() == sd[k].data_ptr() and torch.equal(res.weight, sd[k]), (name, k)
