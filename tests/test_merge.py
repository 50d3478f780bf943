"""Merge methods: hand-computed values, a TIES worked example in both trim scopes, DARE, the driver's checks."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.errors import EPMQError
from epmq.io import SafetensorsStream, save_safetensors_atomic
from epmq.merge import METHODS, lazy_state_dict, merge_files, merge_state_dicts, merge_stream
from epmq.merge.average import average
from epmq.merge.dare import dare
from epmq.merge.task_arithmetic import task_arithmetic
from epmq.merge.ties import global_thresholds, ties

T = torch.tensor


def test_registry_metadata():
    assert set(METHODS) == {"average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"}
    assert "2212.04089" in METHODS["task_arithmetic"].paper
    assert "2306.01708" in METHODS["ties"].paper and "2311.03099" in METHODS["dare_ties"].paper
    assert METHODS["task_arithmetic"].defaults["lam"] == 0.3
    ties_defaults = METHODS["ties"].defaults
    assert (ties_defaults["k"], ties_defaults["lam"], ties_defaults["merge_func"]) == (20.0, 0.3, "sum")
    assert ties_defaults["trim_scope"] == "global" and ties_defaults["dare_p"] == 0.0
    assert not METHODS["average"].needs_base and METHODS["ties"].needs_base
    with pytest.raises(Exception):
        METHODS["ties"].name = "other"  # frozen


def test_import_does_not_load_torch():
    code = "import sys, epmq.merge; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- average and task arithmetic: hand-computed --------------------------------------------------------


def test_average_hand_computed():
    experts = [T([1.0, 2.0, -4.0]), T([3.0, 0.0, 2.0]), T([2.0, 1.0, 5.0])]
    assert torch.equal(average(None, experts), T([2.0, 1.0, 1.0]))


def test_task_arithmetic_hand_computed():
    base = T([1.0, -1.0, 0.5])
    experts = [T([2.0, -1.0, 0.0]), T([1.5, 1.0, 1.0])]
    # τ1 = [1, 0, -0.5], τ2 = [0.5, 2, 0.5], Σ = [1.5, 2, 0]; θ0 + 0.5 Σ = [1.75, 0, 0.5]
    assert torch.equal(task_arithmetic(base, experts, lam=0.5), T([1.75, 0.0, 0.5]))


def test_driver_average_without_base_and_dtype():
    experts = [{"w": T([1.0, 3.0], dtype=torch.bfloat16)}, {"w": T([2.0, 6.0], dtype=torch.bfloat16)}]
    out = merge_state_dicts(None, experts, "average")
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), T([1.5, 4.5]))


def test_driver_computes_in_float32_returns_base_dtype():
    base = {"w": T([1.0, 1.0, 1.0], dtype=torch.float16)}
    experts = [{"w": T([1.0009765625, 1.0, 1.0], dtype=torch.float16)} for _ in range(3)]
    out = merge_state_dicts(base, experts, "task_arithmetic", lam=1.0)
    # 3 × the float16 ulp at 1 (2^-10), summed in float32, is exactly representable: 1 + 3·2^-10
    assert out["w"].dtype == torch.float16
    assert out["w"][0].item() == 1.0 + 3 * 2**-10


# --- TIES: a worked example -----------------------------------------------------------------------------
#
# Two tensors "a" and "b" of 5 entries, 3 experts, k = 20 (%), λ = 0.5. The reference TIES rule keeps the
# entries with |τ| ≥ the r-th smallest |τ|, r = n − ⌊n·k/100⌋.
THETA0 = {"a": T([1.0, 2.0, -1.0, 0.5, 0.0]), "b": torch.zeros(5)}
TAUS = {
    "a": [
        T([2.0, 0.25, -1.0, 0.5, -0.125]),
        T([-0.5, 1.5, -0.25, 1.0, 0.125]),
        T([-3.0, 0.5, -2.0, 0.25, 0.0625]),
    ],
    "b": [
        T([0.1875, -0.0625, 0.0, 0.125, 0.0]),
        T([4.0, -3.0, 0.5, 0.0, 0.25]),
        T([0.3125, 0.0, -0.125, 0.0, 0.0]),
    ],
}
EXPERTS = [{key: THETA0[key] + TAUS[key][t] for key in THETA0} for t in range(3)]


def test_ties_worked_example_tensor_scope():
    # Per tensor: n = 5, r = 5 − ⌊5·0.2⌋ = 4, so each task keeps |τ| ≥ its 4th smallest |τ| (2 entries).
    # Tensor a:  thresholds c = (1.0, 1.0, 2.0)
    #   τ̂1 = [ 2,   0,   -1, 0, 0]
    #   τ̂2 = [ 0,   1.5,  0, 1, 0]
    #   τ̂3 = [-3,   0,   -2, 0, 0]
    #   Σ   = [-1,  1.5, -3, 1, 0]  -> elected γ = [-, +, -, +, (+)]
    #   disjoint mean: [-3/1, 1.5/1, (-1-2)/2, 1/1, 0] = [-3, 1.5, -1.5, 1, 0]
    #   θ = θ0 + 0.5·τ_m = [1-1.5, 2+0.75, -1-0.75, 0.5+0.5, 0] = [-0.5, 2.75, -1.75, 1.0, 0.0]
    experts_a = [e["a"] for e in EXPERTS]
    merged = ties(THETA0["a"], experts_a, k=20, lam=0.5, trim_scope="tensor", merge_func="mean")
    assert torch.equal(merged, T([-0.5, 2.75, -1.75, 1.0, 0.0]))
    #   disjoint sum:  [-3, 1.5, -3, 1, 0] -> θ = [-0.5, 2.75, -2.5, 1.0, 0.0]
    merged_sum = ties(THETA0["a"], experts_a, k=20, lam=0.5, trim_scope="tensor", merge_func="sum")
    assert torch.equal(merged_sum, T([-0.5, 2.75, -2.5, 1.0, 0.0]))

    # Tensor b:  thresholds c = (0.125, 3.0, 0.125)
    #   τ̂1 = [0.1875, 0,  0,      0.125, 0]
    #   τ̂2 = [4,     -3,  0,      0,     0]
    #   τ̂3 = [0.3125, 0, -0.125,  0,     0]
    #   Σ   = [4.5,   -3, -0.125, 0.125, 0] -> γ = [+, -, -, +, (+)]
    #   disjoint mean: [(0.1875+4+0.3125)/3, -3, -0.125, 0.125, 0] = [1.5, -3, -0.125, 0.125, 0]
    #   θ = 0 + 0.5·τ_m = [0.75, -1.5, -0.0625, 0.0625, 0]
    out = merge_state_dicts(THETA0, EXPERTS, "ties", k=20, lam=0.5, trim_scope="tensor", merge_func="mean")
    assert torch.equal(out["a"], T([-0.5, 2.75, -1.75, 1.0, 0.0]))
    assert torch.equal(out["b"], T([0.75, -1.5, -0.0625, 0.0625, 0.0]))


def test_ties_worked_example_global_scope():
    # Global: each task's 10 entries (a and b together), r = 10 − ⌊10·0.2⌋ = 8, keep |τ| ≥ 8th smallest.
    #   task 1 |τ| sorted: 0 0 .0625 .125 .125 .1875 .25 [.5] 1 2   -> c1 = 0.5 (keeps a: 2, -1, 0.5)
    #   task 2 |τ| sorted: 0 .125 .25 .25 .5 .5 1 [1.5] 3 4          -> c2 = 1.5 (keeps a: 1.5; b: 4, -3)
    #   task 3 |τ| sorted: 0 0 0 .0625 .125 .25 .3125 [.5] 2 3      -> c3 = 0.5 (keeps a: -3, 0.5, -2)
    keys = ["a", "b"]
    thresholds = global_thresholds(lambda key: (THETA0[key], [e[key] for e in EXPERTS]), keys, k=20)
    assert thresholds == [0.5, 1.5, 0.5]
    # Tensor a:
    #   τ̂1 = [ 2,  0,   -1, 0.5, 0]
    #   τ̂2 = [ 0,  1.5,  0, 0,   0]      (1.0 is now below c2 = 1.5)
    #   τ̂3 = [-3,  0.5, -2, 0,   0]      (0.5 now survives)
    #   Σ   = [-1, 2,   -3, 0.5, 0] -> γ = [-, +, -, +, (+)]
    #   disjoint mean: [-3, (1.5+0.5)/2, (-1-2)/2, 0.5, 0] = [-3, 1, -1.5, 0.5, 0]
    #   θ = θ0 + 0.5·τ_m = [-0.5, 2.5, -1.75, 0.75, 0]      (tensor scope gave [-0.5, 2.75, -1.75, 1.0, 0])
    # Tensor b: only task 2 survives, τ̂2 = [4, -3, 0, 0, 0] -> θ = [2, -1.5, 0, 0, 0]
    out = merge_state_dicts(THETA0, EXPERTS, "ties", k=20, lam=0.5, merge_func="mean")  # global trim: the default
    assert torch.equal(out["a"], T([-0.5, 2.5, -1.75, 0.75, 0.0]))
    assert torch.equal(out["b"], T([2.0, -1.5, 0.0, 0.0, 0.0]))
    # the pure tensor function with the same thresholds gives the same tensor
    same = ties(THETA0["a"], [e["a"] for e in EXPERTS], k=20, lam=0.5, thresholds=thresholds, merge_func="mean")
    assert torch.equal(same, out["a"])


def test_ties_zero_sum_takes_majority_sign():
    # k = 100 keeps everything. Entry 0: τ = [1, -1] sums to 0; entries 1, 2 elect +, so entry 0 takes +
    # and its disjoint mean is 1 (the agreeing expert only).
    base = torch.zeros(3)
    experts = [T([1.0, 2.0, 3.0]), T([-1.0, 1.0, 1.0])]
    assert torch.equal(ties(base, experts, k=100, lam=1.0, trim_scope="tensor", merge_func="mean"), T([1.0, 1.5, 2.0]))


def _fusionbench_ties(base, experts, keys, k, lam, merge_func):
    """Reference: FusionBench's TIES on the whole flattened state dict (kthvalue per task row)."""
    flat_base = torch.cat([base[key].flatten() for key in keys])
    tv = torch.stack([torch.cat([e[key].flatten() for key in keys]) for e in experts]) - flat_base
    d = tv.shape[1]
    kth = tv.abs().kthvalue(d - int(d * (k / 100)), dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = selected.sum(0)
    if merge_func == "mean":
        merged = merged / (selected != 0).sum(0).float().clamp(min=1)
    flat = flat_base + lam * merged
    out, start = {}, 0
    for key in keys:
        n = base[key].numel()
        out[key] = flat[start : start + n].reshape(base[key].shape)
        start += n
    return out


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
@pytest.mark.parametrize("k", [5, 20, 50])
def test_ties_global_matches_flattened_reference(merge_func, k):
    gen = torch.Generator().manual_seed(0)
    shapes = {"blk.0.attn.weight": (6, 4), "blk.0.bias": (6,), "blk.1.mlp.weight": (3, 5, 2)}
    base = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    experts = [{key: v + (t + 1) * torch.randn(v.shape, generator=gen) for key, v in base.items()} for t in range(4)]
    out = merge_state_dicts(base, experts, "ties", k=k, lam=0.3, merge_func=merge_func)
    ref = _fusionbench_ties(base, experts, sorted(shapes), k, 0.3, merge_func)
    for key in shapes:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-6)
    # and the per-tensor scope really is different here
    per_tensor = merge_state_dicts(base, experts, "ties", k=k, lam=0.3, merge_func=merge_func, trim_scope="tensor")
    assert any(not torch.equal(per_tensor[key], out[key]) for key in shapes)


def test_global_thresholds_exact_with_ties_and_zeros():
    gen = torch.Generator().manual_seed(1)
    base = {"x": torch.zeros(40), "y": torch.zeros(7, 3)}
    # quantised values: many exact duplicates and zeros
    experts = [
        {key: torch.randint(-3, 4, v.shape, generator=gen).float() / 4 for key, v in base.items()} for _ in range(3)
    ]
    load = lambda key: (base[key], [e[key] for e in experts])  # noqa: E731
    for k in (1, 20, 33.3, 90, 100):
        flat = torch.stack([torch.cat([e["x"], e["y"].flatten()]) for e in experts]).abs()
        rank = flat.shape[1] - int(flat.shape[1] * (k / 100))
        expected = flat.kthvalue(rank, dim=1).values.tolist() if rank else [0.0, 0.0, 0.0]
        assert global_thresholds(load, ["x", "y"], k=k) == expected


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_global_equals_tensor_scope_on_a_single_tensor(method):
    # One tensor = the whole model, so both scopes trim at the same threshold; with DARE this also checks
    # that the threshold pass draws the same drop masks as the merge.
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(50, generator=gen)}
    experts = [{"w": base["w"] + torch.randn(50, generator=gen)} for _ in range(3)]
    glob = merge_state_dicts(base, experts, method, trim_scope="global")
    local = merge_state_dicts(base, experts, method, trim_scope="tensor")
    assert torch.equal(glob["w"], local["w"])


def test_ties_global_needs_thresholds():
    with pytest.raises(EPMQError, match="thresholds"):
        ties(torch.zeros(3), [torch.ones(3)], trim_scope="global")
    with pytest.raises(EPMQError, match="thresholds"):
        ties(torch.zeros(3), [torch.ones(3)], trim_scope="tensor", thresholds=[0.5])


# --- DARE -----------------------------------------------------------------------------------------------


def _random_model(seed, n_experts=3):
    gen = torch.Generator().manual_seed(seed)
    base = {"l1.weight": torch.randn(8, 6, generator=gen), "l1.bias": torch.randn(8, generator=gen)}
    experts = [{key: v + torch.randn(v.shape, generator=gen) for key, v in base.items()} for _ in range(n_experts)]
    return base, experts


@pytest.mark.parametrize(("dare_method", "plain"), [("dare_task_arithmetic", "task_arithmetic"), ("dare_ties", "ties")])
def test_dare_p0_equals_base_method_exactly(dare_method, plain):
    base, experts = _random_model(3)
    with_dare = merge_state_dicts(base, experts, dare_method, dare_p=0.0, seed=123)
    without = merge_state_dicts(base, experts, plain)
    assert all(torch.equal(with_dare[key], without[key]) for key in base)


def test_dare_deterministic_and_unbiased():
    tau = torch.linspace(-2.0, 2.0, 1000)
    assert torch.equal(dare(tau, 0.7, seed=5), dare(tau, 0.7, seed=5))
    assert not torch.equal(dare(tau, 0.7, seed=5), dare(tau, 0.7, seed=6))
    dropped = dare(tau, 0.7, seed=5)
    kept = dropped != 0
    assert torch.allclose(dropped[kept], tau[kept] / 0.3)  # survivors rescaled by 1/(1−p)
    assert abs(kept.float().mean().item() - 0.3) < 0.05  # ~ (1−p) survive
    mean = torch.stack([dare(tau, 0.7, seed=s) for s in range(4000)]).mean(0)
    # E[DARE(τ)] = τ; per-entry std of the mean is |τ|·sqrt(p/(1−p)/4000) ≤ 0.049 for |τ| ≤ 2
    assert (mean - tau).abs().max().item() < 0.25
    assert abs((mean - tau).mean().item()) < 0.01
    assert dare(tau, 0.0, seed=5) is tau


def test_dare_driver_deterministic_given_seed():
    base, experts = _random_model(4)
    first = merge_state_dicts(base, experts, "dare_task_arithmetic", dare_p=0.5, seed=1)
    again = merge_state_dicts(base, experts, "dare_task_arithmetic", dare_p=0.5, seed=1)
    other = merge_state_dicts(base, experts, "dare_task_arithmetic", dare_p=0.5, seed=2)
    assert all(torch.equal(first[key], again[key]) for key in base)
    assert not torch.equal(first["l1.weight"], other["l1.weight"])
    # masks depend on (seed, key, task), not on the order the keys are visited in
    reordered = {key: base[key] for key in reversed(list(base))}
    swapped = merge_state_dicts(reordered, experts, "dare_task_arithmetic", dare_p=0.5, seed=1)
    assert all(torch.equal(first[key], swapped[key]) for key in base)


# --- driver: exclusion, streaming, checks -----------------------------------------------------------------


def _model_with_heads(shift: float):
    return {
        "encoder.multihead_attn.in_proj_weight": torch.full((2, 2), shift),
        "encoder.fc.weight": torch.full((3,), shift),
        "head.weight": torch.full((2,), 10 + shift),
        "text.lm_head.weight": torch.full((2,), 20 + shift),
        "classifier.out_proj.bias": torch.full((2,), 30 + shift),
        "embeddings.position_ids": torch.arange(4),
        "bn.num_batches_tracked": torch.tensor(7 + int(shift)),
        "attn_mask": torch.full((2, 2), float("-inf")).triu(1),
    }


def test_excluded_keys_copied_from_base():
    base = _model_with_heads(0.0)
    experts = [_model_with_heads(1.0), _model_with_heads(3.0)]
    out = merge_state_dicts(base, experts, "task_arithmetic", lam=0.5)
    # merged: θ0 + 0.5 (1 + 3) = 2, including multihead_attn (not a head)
    assert torch.equal(out["encoder.multihead_attn.in_proj_weight"], torch.full((2, 2), 2.0))
    assert torch.equal(out["encoder.fc.weight"], torch.full((3,), 2.0))
    for key in (
        "head.weight",
        "text.lm_head.weight",
        "classifier.out_proj.bias",
        "embeddings.position_ids",
        "bn.num_batches_tracked",
        "attn_mask",
    ):
        assert torch.equal(out[key], base[key]), key
    assert out["head.weight"] is not base["head.weight"]  # a copy, not an alias
    # with no base, excluded keys come from expert 0
    averaged = merge_state_dicts(None, experts, "average")
    assert torch.equal(averaged["head.weight"], experts[0]["head.weight"])
    assert torch.equal(averaged["encoder.fc.weight"], torch.full((3,), 2.0))
    # without the default patterns heads are merged too (non-float buffers are still copied), and the
    # -inf attention mask is refused as a non-finite input (the base's, checked before the experts are read)
    with pytest.raises(EPMQError, match=r"attn_mask \(base\)"):
        merge_state_dicts(base, experts, "task_arithmetic", exclude=())
    everything = merge_state_dicts(base, experts, "task_arithmetic", lam=0.5, exclude=[r"attn_mask$"])
    assert torch.equal(everything["head.weight"], torch.full((2,), 12.0))
    assert torch.equal(everything["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


def test_excluded_heads_may_differ_in_shape():
    base, experts = _random_model(5)
    base["head.weight"] = torch.zeros(2, 8)
    experts[0]["head.weight"] = torch.zeros(5, 8)  # a 5-class task
    experts[1]["head.weight"] = torch.zeros(3, 8)
    experts[2]["head.weight"] = torch.zeros(2, 8)
    out = merge_state_dicts(base, experts, "ties")
    assert out["head.weight"].shape == (2, 8)


class CountingStateDict(dict):
    """A state dict that counts tensor loads, to check the driver streams one tensor at a time."""

    def __init__(self, *args):
        super().__init__(*args)
        self.loads = Counter()

    def __getitem__(self, key):
        self.loads[key] += 1
        return super().__getitem__(key)


def test_driver_reads_each_expert_tensor_once_per_pass():
    base, experts = _random_model(6)
    experts = [CountingStateDict(e) for e in experts]
    merge_state_dicts(base, experts, "task_arithmetic")
    assert all(set(e.loads.values()) == {1} and set(e.loads) == set(base) for e in experts)
    for e in experts:
        e.loads.clear()
    merge_state_dicts(base, experts, "ties")  # global trim: two threshold passes + the merge
    assert all(set(e.loads.values()) == {3} for e in experts)


def test_mismatched_keys_raise():
    base, experts = _random_model(7)
    del experts[1]["l1.bias"]
    with pytest.raises(EPMQError, match=r"l1\.bias.*expert 1"):
        merge_state_dicts(base, experts, "task_arithmetic")
    experts[1]["l1.bias"] = base["l1.bias"].clone()
    experts[2]["l2.weight"] = torch.zeros(2)
    with pytest.raises(EPMQError, match=r"l2\.weight.*expert 2"):
        merge_state_dicts(base, experts, "task_arithmetic")


def test_mismatched_shape_or_dtype_raise():
    base, experts = _random_model(8)
    experts[2]["l1.weight"] = torch.zeros(6, 8)
    with pytest.raises(EPMQError, match=r"l1\.weight: expert 2 has \(6, 8\)"):
        merge_state_dicts(base, experts, "ties")
    experts[2]["l1.weight"] = base["l1.weight"].double()
    with pytest.raises(EPMQError, match=r"l1\.weight: expert 2 .*float64"):
        merge_state_dicts(base, experts, "task_arithmetic")


def test_non_finite_inputs_raise():
    base, experts = _random_model(9)
    experts[1]["l1.weight"][0, 0] = float("nan")
    with pytest.raises(EPMQError, match=r"l1\.weight \(expert 1\)"):
        merge_state_dicts(base, experts, "ties")
    experts[1]["l1.weight"][0, 0] = 0.0
    base["l1.bias"][3] = float("inf")
    with pytest.raises(EPMQError, match=r"l1\.bias \(base\)"):
        merge_state_dicts(base, experts, "task_arithmetic")


def test_bad_arguments_raise():
    base, experts = _random_model(10)
    with pytest.raises(EPMQError, match="method='fisher'"):
        merge_state_dicts(base, experts, "fisher")
    with pytest.raises(EPMQError, match="unknown hyperparameter 'lamda'"):
        merge_state_dicts(base, experts, "task_arithmetic", lamda=0.3)
    with pytest.raises(EPMQError, match="base: None"):
        merge_state_dicts(None, experts, "task_arithmetic")
    with pytest.raises(EPMQError, match="experts"):
        merge_state_dicts(base, [], "average")
    with pytest.raises(EPMQError, match="k=0"):
        merge_state_dicts(base, experts, "ties", k=0)
    with pytest.raises(EPMQError, match="dare_p=1.0"):
        merge_state_dicts(base, experts, "dare_ties", dare_p=1.0)
    with pytest.raises(EPMQError, match="merge_func='max'"):
        merge_state_dicts(base, experts, "ties", merge_func="max")
    with pytest.raises(EPMQError, match="trim_scope='layer'"):
        merge_state_dicts(base, experts, "ties", trim_scope="layer")
    with pytest.raises(EPMQError, match=r"exclude pattern '\('"):
        merge_state_dicts(base, experts, "average", exclude=["("])
    with pytest.raises(EPMQError, match="nothing to merge"):
        merge_state_dicts(base, experts, "average", exclude=[r"^l1\."])


# --- files ----------------------------------------------------------------------------------------------


def test_merge_files_round_trip(tmp_path):
    base, experts = _random_model(11)
    base["head.weight"] = torch.randn(2, 8)
    for e in experts:
        e["head.weight"] = torch.randn(2, 8)
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for t, e in enumerate(experts):
        paths.append(tmp_path / f"expert{t}.safetensors")
        save_file(e, paths[-1])

    lazy = lazy_state_dict(tmp_path / "base.safetensors")
    assert set(lazy) == set(base) and len(lazy) == len(base)
    assert torch.equal(lazy["l1.weight"], base["l1.weight"])
    with pytest.raises(KeyError):
        lazy["missing"]

    out = merge_files(tmp_path / "base.safetensors", paths, tmp_path / "out" / "merged.safetensors", "ties", lam=0.4)
    merged = load_file(out)
    expected = merge_state_dicts(base, experts, "ties", lam=0.4)
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[key], expected[key]) for key in expected)
    assert torch.equal(merged["head.weight"], base["head.weight"])
    meta = lazy_state_dict(out).metadata()
    assert meta["epmq.merge.method"] == "ties" and json.loads(meta["epmq.merge.hparams"])["lam"] == 0.4
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]  # no temp file left


def test_merge_files_failure_leaves_no_file(tmp_path):
    base, experts = _random_model(12)
    experts[0]["l1.weight"][0, 0] = float("nan")
    save_file(base, tmp_path / "base.safetensors")
    save_file(experts[0], tmp_path / "e0.safetensors")
    with pytest.raises(EPMQError, match=r"l1\.weight \(expert 0\)"):
        merge_files(tmp_path / "base.safetensors", [tmp_path / "e0.safetensors"], tmp_path / "m.safetensors", "ties")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(EPMQError, match="nope.safetensors"):
        lazy_state_dict(tmp_path / "nope.safetensors")


def test_lazy_state_dict_reads_every_dtype_and_validates_the_file(tmp_path):
    sd = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
          "f64": torch.randn(2).double(), "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
          "u8": torch.tensor([250], dtype=torch.uint8), "bool": torch.tensor([True, False]),
          "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"k": "v"})
    lazy = lazy_state_dict(path)
    assert list(lazy) == sorted(sd) and lazy.metadata() == {"k": "v"}
    for k, v in sd.items():
        got = lazy[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    got = lazy["f32"]
    got += 1  # a private copy: neither the file nor the next read changes
    assert torch.equal(lazy["f32"], sd["f32"])

    raw = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-8])  # truncated data
    with pytest.raises(EPMQError, match=r"short\.safetensors.*truncated"):
        lazy_state_dict(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + raw)
    with pytest.raises(EPMQError, match=r"junk\.safetensors: not a readable safetensors file"):
        lazy_state_dict(tmp_path / "junk.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "short_w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(EPMQError, match=r"short_w\.safetensors: tensor 'w': 4 bytes for shape \[2\] F32"):
        lazy_state_dict(tmp_path / "short_w.safetensors")  # caught when the header is read, not on first use
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(EPMQError, match=r"tiny\.safetensors: not a readable"):
        lazy_state_dict(tmp_path / "tiny.safetensors")


def test_lazy_state_dict_does_not_map_the_file(tmp_path):
    """Reads go through pread, not a memory map: a streamed expert's pages never count towards the RSS."""
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(1024, 1024)}, path)
    lazy = lazy_state_dict(path)
    assert torch.equal(lazy["w"], lazy["w"])
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()


# --- streaming: the same bits as the in-memory merge, one key's tensors at a time ---------------------------


@pytest.fixture(scope="module")
def previous():
    """bench/merge_bench.py's transcriptions of the methods as they were computed before the streamed form
    (task arithmetic over a list of every τ_t; TIES vectorised over a stack of them)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "merge_bench.py"
    spec = importlib.util.spec_from_file_location("merge_bench_previous", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quantised_experts(seed, n_experts, shape=(33, 17), dtype=torch.float32):
    """A base and experts whose task vectors are multiples of 1/4: many exact ties, zeros and zero sums."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    steps = [torch.randint(-3, 4, shape, generator=gen).float() / 4 for _ in range(n_experts)]
    return base, [(base.float() + s).to(dtype) for s in steps]


@pytest.mark.parametrize("n_experts", [1, 2, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streamed_methods_equal_the_previous_vectorised_ones_bit_for_bit(n_experts, dtype, previous):
    base, experts = _quantised_experts(n_experts, n_experts, dtype=dtype)
    for hp in ({}, {"lam": 0.7}, {"dare_p": 0.4, "seed": 9}):
        assert torch.equal(task_arithmetic(base, experts, **hp), previous.previous_task_arithmetic(base, experts, **hp))
    thresholds = [0.25 * (t % 3) for t in range(n_experts)]
    for hp in ({"thresholds": thresholds}, {"thresholds": thresholds, "merge_func": "mean", "lam": 1.0},
               {"trim_scope": "tensor", "k": 10}, {"trim_scope": "tensor", "k": 100, "merge_func": "mean"},
               {"trim_scope": "tensor", "k": 50, "dare_p": 0.3, "seed": 4}):
        new, old = ties(base, experts, **hp), previous.previous_ties(base, experts, **hp)
        assert torch.equal(new, old) and new.view(torch.int32).equal(old.view(torch.int32)), hp  # -0.0 too


class LiveCountingStateDict(Mapping):
    """A lazy state dict that hands out a fresh copy per read (as a safetensors file does), counting reads
    per key and how many of the tensors it handed out are alive at once (over every instance of a group)."""

    def __init__(self, tensors: dict, group: dict):
        self._tensors, self.group, self.reads = tensors, group, Counter()

    def __getitem__(self, key):
        self.reads[key] += 1
        tensor = self._tensors[key].clone()
        self.group["alive"] += 1
        self.group["peak"] = max(self.group["peak"], self.group["alive"])
        weakref.finalize(tensor, self.group.__setitem__, "alive", self.group["alive"] - 1)
        return tensor

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def describe(self, key):  # as a safetensors file's header tells it, without a read
        return self._tensors[key].dtype, tuple(self._tensors[key].shape)


@pytest.mark.parametrize(("method", "hp", "reads"), [
    ("task_arithmetic", {}, 1), ("dare_task_arithmetic", {}, 1), ("ties", {}, 3), ("dare_ties", {}, 3),
    ("ties", {"trim_scope": "tensor"}, 1), ("average", {}, 1),
])
def test_streamed_merge_reads_each_expert_tensor_once_per_pass_and_holds_one(method, hp, reads):
    n_experts = 6
    base_sd, expert_sds = _random_model(13, n_experts)
    base_sd["head.weight"] = torch.randn(2, 8)
    for e in expert_sds:
        e["head.weight"] = torch.randn(2, 8)
    expected = merge_state_dicts(None if method == "average" else base_sd, expert_sds, method, **hp)
    group = {"alive": 0, "peak": 0}
    base = LiveCountingStateDict(base_sd, group)
    experts = [LiveCountingStateDict(e, group) for e in expert_sds]
    stream = merge_stream(None if method == "average" else base, experts, method, **hp)
    got = {}
    for key, tensor in stream.tensors():
        got[key] = tensor  # what a writer does with it: here kept, to compare; it is not a handed-out copy
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    # every expert key a method merges is read once per pass (TIES' global trim: two threshold passes + the
    # merge); the head is read from expert 0 only when it is the reference (no base)
    for t, e in enumerate(experts):
        assert {e.reads[key] for key in ("l1.weight", "l1.bias")} == {reads}, t
    # never more than the base tensor and one expert tensor read at once, not the T + 1 of a key
    assert group["peak"] <= 2 < n_experts + 1


def test_streamed_file_equals_the_saved_in_memory_merge_byte_for_byte(tmp_path):
    """What the merge job writes, streamed, against what it wrote before: every checkpoint loaded whole,
    merged in memory, saved with save_file (one metadata entry, as the job writes)."""
    base, experts = _random_model(14, 4)
    base["head.weight"], base["pos.position_ids"] = torch.randn(2, 8), torch.arange(5)
    base["half.weight"] = torch.randn(4, 3).half()
    for e in experts:
        e["head.weight"], e["pos.position_ids"] = torch.randn(2, 8), torch.arange(5)
        e["half.weight"] = (base["half.weight"].float() + torch.randn(4, 3)).half()
    save_file(base, tmp_path / "base.safetensors")
    for t, e in enumerate(experts):
        save_file(e, tmp_path / f"e{t}.safetensors")
    for method, hp in [("task_arithmetic", {"lam": 0.3}), ("ties", {"k": 20, "lam": 0.5}),
                       ("dare_ties", {"merge_func": "mean"})]:
        meta = {"epmq_merge": json.dumps(hp)}
        whole = merge_state_dicts(load_file(tmp_path / "base.safetensors"),
                                  [load_file(tmp_path / f"e{t}.safetensors") for t in range(4)], method, **hp)
        before = save_safetensors_atomic(tmp_path / "before" / f"{method}.safetensors", whole, metadata=meta)
        stream = merge_stream(lazy_state_dict(tmp_path / "base.safetensors"),
                              [lazy_state_dict(tmp_path / f"e{t}.safetensors") for t in range(4)], method, **hp)
        with SafetensorsStream(tmp_path / "after" / f"{method}.safetensors", stream.layout, meta) as writer:
            for key, tensor in stream.tensors(order=writer.order):
                writer.write(key, tensor)
        assert writer.path.read_bytes() == before.read_bytes(), method
    after, before = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("after", "before"))
    assert after == before  # no temp file left


def test_safetensors_stream_writes_what_save_file_writes(tmp_path):
    gen = torch.Generator().manual_seed(15)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.float16,
              torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64]
    tensors = {}
    for i, dtype in enumerate(dtypes):
        for name in ("b", "a.x", "Z", "é"):  # name order within a dtype: by code point, as safetensors sorts
            tensors[f"{name}{i}"] = torch.randint(0, 100, (3, i % 4 + 1), generator=gen).to(dtype)
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
                "strided": torch.randn(4, 5, generator=gen).t()}
    layout = {k: (v.dtype, v.shape) for k, v in tensors.items()}
    for meta in (None, {"epmq_merge": '{"lam": 0.3}'}, {"odd": "a\n\u2028é\"/\x7f\x01\\"}):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata=meta)
        with SafetensorsStream(tmp_path / "out.safetensors", layout, meta) as writer:
            for key in writer.order:
                writer.write(key, tensors[key])
        assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), meta
    # misuse is refused, and a failed stream leaves neither the file nor its temp file
    with pytest.raises(ValueError, match="out of order"):
        with SafetensorsStream(tmp_path / "bad.safetensors", layout) as writer:
            writer.write(writer.order[1], tensors[writer.order[1]])
    with pytest.raises(ValueError, match="header says"):
        with SafetensorsStream(tmp_path / "bad.safetensors", layout) as writer:
            writer.write(writer.order[0], tensors[writer.order[0]].reshape(-1))
    with pytest.raises(ValueError, match="not written"):
        with SafetensorsStream(tmp_path / "bad.safetensors", layout) as writer:
            writer.write(writer.order[0], tensors[writer.order[0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]


class _SelectSuite:
    """The parts of a suite the merge job uses; validation accuracy peaks at the merge whose weight sum is
    closest to ``target``. Counts the encoders alive at once."""

    name = "fake"
    merge_exclude = None

    def __init__(self, folder: Path, target: float):
        self.folder, self.target, self.tasks = folder, target, ("a", "b", "c")
        self.base_path = folder / "base.safetensors"
        self.alive, self.peak = 0, 0

    def expert_path(self, task):
        return self.folder / f"{task}.safetensors"

    def new_encoder(self):
        import gc

        gc.collect()
        enc = torch.nn.Sequential(torch.nn.Linear(6, 8))
        enc.register_buffer("steps", torch.tensor(0))
        enc.head = torch.nn.Linear(8, 2)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(enc, setattr, self, "alive", self.alive - 1)
        return enc

    def evaluate_all(self, encoder, split):
        assert split == "validation"
        score = -abs(float(encoder[0].weight.detach().double().sum()) - self.target)
        return {"tasks": {t: {"accuracy": score + i} for i, t in enumerate(self.tasks)}}


def test_merge_job_selects_streamed_and_writes_what_it_wrote_before(tmp_path, monkeypatch):
    from epmq import pipeline

    gen = torch.Generator().manual_seed(16)
    base = {"0.weight": torch.randn(8, 6, generator=gen), "0.bias": torch.randn(8, generator=gen),
            "steps": torch.tensor(0), "head.weight": torch.randn(2, 8, generator=gen), "head.bias": torch.zeros(2)}
    experts = [{k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
               for _ in range(3)]
    save_file(base, tmp_path / "base.safetensors")
    for task, e in zip("abc", experts):
        save_file(e, tmp_path / f"{task}.safetensors")
    lams = [0.1, 0.5, 1.0]
    whole = {lam: merge_state_dicts(base, experts, "ties", k=20, lam=lam) for lam in lams}
    target = float(whole[0.5]["0.weight"].double().sum()) + 1e-3  # λ = 0.5 wins
    suite = _SelectSuite(tmp_path, target)
    monkeypatch.setattr(pipeline, "open_suite", lambda spec: suite)
    out = tmp_path / "merged" / "ties.safetensors"
    record = pipeline.merge({}, "ties", "ties", {"k": 20}, {"lam": lams}, out)
    assert record["params"] == {"k": 20, "lam": 0.5} and [t["params"]["lam"] for t in record["trials"]] == lams
    expected = save_safetensors_atomic(tmp_path / "before.safetensors", whole[0.5],
                                       metadata={"epmq_merge": json.dumps({"k": 20, "lam": 0.5})})
    assert out.read_bytes() == expected.read_bytes()
    assert suite.peak == 1  # one encoder at a time, and no merged state dict beside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["ties.json", "ties.safetensors"]  # no temp file left
    # one candidate: nothing to evaluate, streamed straight to the file
    single = pipeline.merge({}, "ta", "task_arithmetic", {"lam": 0.3}, {}, tmp_path / "merged" / "ta.safetensors")
    assert "validation" not in single["trials"][0]
    assert load_file(tmp_path / "merged" / "ta.safetensors").keys() == base.keys()
    # a failing evaluation leaves no file and no temp file behind
    monkeypatch.setattr(suite, "evaluate_all", lambda enc, split: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pipeline.merge({}, "bad", "ties", {}, {"lam": lams}, tmp_path / "merged" / "bad.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["ta.json", "ta.safetensors", "ties.json",
                                                            "ties.safetensors"]


def test_merge_bench_smoke(tmp_path):
    """bench/merge_bench.py on a tiny tower (not a benchmark): both job forms run, write the same bytes, and
    the CSV has its columns."""
    import csv
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")
    bench = Path(__file__).resolve().parents[1] / "bench" / "merge_bench.py"
    spec = importlib.util.spec_from_file_location("merge_bench", bench)
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    out = tmp_path / "r.csv"
    args = mb.parse_args(["--width", "64", "--blocks", "1", "--experts", "2", "--methods", "ties",
                          "--dir", str(tmp_path / "ckpt"), "--out", str(out)])
    rows = mb.bench(args)
    mb.write_csv(rows, out, mb.CSV_COLUMNS)
    assert [(r["mode"], r["same_bytes_as_whole"], r["note"]) for r in rows] == [("whole", "-", ""),
                                                                               ("stream", "true", "")]
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows)
    with open(out, newline="") as f:
        assert csv.DictReader(f).fieldnames == mb.CSV_COLUMNS
    assert not (tmp_path / "ckpt").exists()  # the checkpoints are deleted afterwards
