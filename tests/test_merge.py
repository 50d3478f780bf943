"""Merge methods: hand-computed values, a TIES worked example in both trim scopes, DARE, the driver's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.errors import EPMQError
from epmq.merge import METHODS, lazy_state_dict, merge_files, merge_state_dicts
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
    # -inf attention mask is refused as a non-finite input
    with pytest.raises(EPMQError, match=r"attn_mask \(expert 0\)"):
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
