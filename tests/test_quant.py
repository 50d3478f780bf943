"""Numeric core: grid, RTN, GPTQ and the E-PMQ target."""

import pytest
import torch

from epmq.errors import EPMQError
from epmq.quant import epmq_target, gptq, rtn
from epmq.quant.result import layer_error
from epmq.quant.target import FoldedStats, TaskStats, objective, solve_target


def correlated_inputs(n, d, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    rank = rank or d
    A = torch.randn(rank, d, generator=g)
    Z = torch.randn(n, rank, generator=g)
    return Z @ A + 0.1 * torch.randn(n, d, generator=g) * (rank == d)


def rand_w(d_out, d_in, seed=1):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_values_on_grid(bits, group_size, sym):
    W = rand_w(6, 32)
    X = correlated_inputs(200, 32)
    for res in (rtn(W, bits, group_size=group_size, sym=sym), gptq(W, X.T @ X, bits, group_size=group_size, sym=sym)):
        assert res.codes.min() >= 0 and res.codes.max() <= 2**bits - 1
        assert torch.equal(res.dequantize(), res.weight)
        gs = 32 if group_size == -1 else group_size
        for g in range(32 // gs):
            cols = (res.g_idx == g).nonzero().flatten()
            for r in range(W.shape[0]):
                assert res.weight[r, cols].unique().numel() <= 2**bits


def test_rtn_hand_computed():
    # row [-1, 0, 0.5, 2], 2 bits asym: min=-1, max=2, scale=3/3=1, zero=round(1/1)=1
    W = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    res = rtn(W, 2)
    assert torch.allclose(res.scales, torch.tensor([[1.0]]))
    assert torch.allclose(res.zeros, torch.tensor([[1.0]]))
    # codes = clamp(round(w/1)+1, 0, 3) = [0, 1, 1 (round(0.5)=0 half-to-even), 3]
    assert res.codes.tolist() == [[0, 1, 1, 3]]
    assert res.weight.tolist() == [[-1.0, 0.0, 0.0, 2.0]]
    # symmetric 2 bits: max=2, min=-2, scale=4/3, zero=2
    res = rtn(W, 2, sym=True)
    assert torch.allclose(res.scales, torch.tensor([[4 / 3]]))
    assert res.zeros.item() == 2.0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (-1, True), (16, False), (16, True)])
def test_gptq_beats_rtn(bits, group_size, act_order):
    W = rand_w(32, 64)
    X = correlated_inputs(512, 64, rank=16) + 0.05 * torch.randn(512, 64)
    H = X.T @ X
    q_rtn = rtn(W, bits, group_size=group_size)
    q_gptq = gptq(W, H, bits, group_size=group_size, act_order=act_order)
    assert layer_error(q_gptq.weight - W, H) < layer_error(q_rtn.weight - W, H)
    if act_order:
        assert q_gptq.perm is not None and sorted(q_gptq.perm.tolist()) == list(range(64))


def test_gptq_static_groups_and_block_sizes():
    W = rand_w(8, 48)
    X = correlated_inputs(300, 48)
    H = X.T @ X
    a = gptq(W, H, 3, group_size=16, act_order=True, static_groups=True)
    # static groups: group index follows the original column position
    assert a.g_idx.tolist() == [c // 16 for c in range(48)]
    b1 = gptq(W, H, 3, block_size=128)
    b2 = gptq(W, H, 3, block_size=7)
    assert torch.allclose(b1.weight, b2.weight, atol=1e-5)


def test_identity_hessian_is_rtn():
    W = rand_w(8, 24)
    assert torch.equal(gptq(W, torch.eye(24), 4, damp=0.0).weight, rtn(W, 4).weight)


def test_singular_hessian_dead_inputs():
    W = rand_w(8, 20)
    X = correlated_inputs(100, 20, rank=3)
    X[:, 5] = 0  # dead input
    res = gptq(W, X.T @ X, 3)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, 5] == 0).all()
    # all-zero Hessian: every input dead, still finite
    res = gptq(W, torch.zeros(20, 20), 3)
    assert torch.isfinite(res.weight).all()


def test_failed_cholesky_raises_damping():
    W = rand_w(4, 6)
    H = torch.eye(6)  # strongly indefinite (eigenvalue -99): damping is raised until it gives up clearly
    H[0, 1] = H[1, 0] = 100.0
    with pytest.raises(EPMQError, match="Cholesky"):
        gptq(W, H, 4, name="blocks.0.fc1")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rtn(rand_w(2, 4), 1), "bits=1"),
        (lambda: rtn(rand_w(2, 4), 9), "bits=9"),
        (lambda: gptq(rand_w(2, 4), torch.eye(5), 4, name="layer.q"), "layer.q.*Hessian shape"),
        (lambda: gptq(torch.full((2, 4), float("nan")), torch.eye(4), 4, name="layer.k"), "layer.k.*NaN"),
        (lambda: gptq(rand_w(2, 4), torch.full((4, 4), float("nan")), 4, name="layer.v"), "layer.v.*Hessian.*NaN"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(EPMQError, match=match):
        call()


# ---------------------------------------------------------------- E-PMQ


def multitask_layer(T=3, d_out=16, d_in=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_m = torch.randn(d_out, d_in, generator=g)
    experts = [W_m + 0.5 * torch.randn(d_out, d_in, generator=g) for _ in range(T)]
    X, Xe = [], []
    for t in range(T):
        mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
        x = torch.randn(n, d_in, generator=g) @ mix * (1 + t)  # tasks with different activation scales
        X.append(x)
        Xe.append(x + 0.2 * torch.randn(n, d_in, generator=g))
    return W_m, experts, X, Xe


def test_epmq_identical_experts_equals_gptq():
    W_m, _, X, _ = multitask_layer()
    W_star, H = epmq_target(W_m, [W_m] * 3, X, X, alpha=1.0, lam_out=0.0, lam_w=0.0, task_weighting="none")
    assert torch.allclose(W_star, W_m, atol=1e-4)
    pooled = sum(x.T @ x for x in X)
    a = gptq(W_star, H, 3)
    b = gptq(W_m, pooled, 3)
    assert torch.allclose(a.weight, b.weight, atol=1e-5)


def test_epmq_huge_anchors():
    W_m, experts, X, Xe = multitask_layer()
    pooled = sum(x.T @ x for x in X)
    W_star, H = epmq_target(W_m, experts, X, Xe, lam_out=1e9, lam_w=0.0)
    assert torch.allclose(W_star, W_m, atol=1e-4)
    assert torch.equal(gptq(W_star, H, 3).codes, gptq(W_m, pooled, 3).codes)
    # huge ridge: target W_m, Hessian ~ identity, so GPTQ reduces to RTN of W_m
    W_star, H = epmq_target(W_m, experts, X, Xe, lam_out=0.0, lam_w=1e9)
    assert torch.allclose(W_star, W_m, atol=1e-4)
    assert torch.equal(gptq(W_star, H, 3).codes, rtn(W_m, 3).codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("weighting", ["none", "trace"])
def test_epmq_objective_below_gptq(bits, weighting):
    W_m, experts, X, Xe = multitask_layer()
    W_star, H = epmq_target(W_m, experts, X, Xe, alpha=1.0, lam_w=1e-2, task_weighting=weighting)
    q_epmq = gptq(W_star, H, bits)
    q_gptq = gptq(W_m, sum(x.T @ x for x in X), bits)
    assert objective(q_epmq.weight, (W_star, H)) < objective(q_gptq.weight, (W_star, H))


def test_epmq_target_is_least_squares_optimum():
    """W* from statistics equals a direct least-squares fit of the objective (lam_w tiny)."""
    W_m, experts, X, Xe = multitask_layer(T=2, d_in=8, d_out=4)
    W_star, _ = epmq_target(W_m, experts, X, Xe, alpha=0.5, lam_out=0.0, lam_w=0.0, task_weighting="none")
    A = torch.cat(X).double()
    Y = torch.cat([(0.5 * xe + 0.5 * x).double() @ w.double().T for x, xe, w in zip(X, Xe, experts)])
    direct = torch.linalg.lstsq(A, Y).solution.T
    assert torch.allclose(W_star.double(), direct, atol=1e-4)


def test_bias_refit_reduces_objective():
    W_m, experts, X, Xe = multitask_layer()
    g = torch.Generator().manual_seed(3)
    b_m = torch.randn(16, generator=g)
    b_e = [b_m + torch.randn(16, generator=g) for _ in experts]
    stats = []
    for x, xe in zip(X, Xe):
        s = TaskStats(32)
        s.add(x, xe)
        stats.append(s)

    def fold():
        f = FoldedStats(16, 32, alpha=1.0, task_weighting="trace")
        for s, w, b in zip(stats, experts, b_e):
            f.add_task(s, w, b)
        return f

    fixed = solve_target(fold(), W_m, b_m, fit_bias=False)
    fitted = solve_target(fold(), W_m, b_m, fit_bias=True)
    Q = gptq(fitted.W_star, fitted.H, 3).weight
    b_new = fitted.refit_bias(Q)

    def full_obj(Qw, b):  # sum_t w_t ||Q X_t + b - (W_t X^e_t + b_t)||^2 + ridge, evaluated directly
        tot = 0.0
        for x, xe, w, bt in zip(X, Xe, experts, b_e):
            r = (x @ Qw.T + b) - (xe @ w.T + bt)
            tot += float((r.double() ** 2).sum()) / float((x.double() ** 2).sum())
        return tot

    Q_fixed = gptq(fixed.W_star, fixed.H, 3).weight
    assert full_obj(Q, b_new) < full_obj(Q_fixed, b_m)


def test_stats_and_matrices_agree():
    W_m, experts, X, Xe = multitask_layer()
    stats = []
    for x, xe in zip(X, Xe):
        s = TaskStats(32)
        for chunk, chunk_e in zip(x.split(50), xe.split(50)):
            s.add(chunk, chunk_e)
        stats.append(s)
    a = epmq_target(W_m, experts, X, Xe)
    b = epmq_target(W_m, experts, stats)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_direct_target_product_equals_fold_of_C(alpha):
    """``TaskStats(direct=...)``: the target product accumulated token by token, ``Y^T Xa`` with the expert's
    outputs on the blended inputs, is ``[W_t b_t] C~_t``; folding it gives the same W* and H as folding C."""
    from epmq.quant.target import direct_pays

    W_m, experts, X, Xe = multitask_layer(T=2, d_out=8, d_in=32)
    g = torch.Generator().manual_seed(5)
    b_e = [torch.randn(8, generator=g) for _ in experts]
    fold_c = FoldedStats(8, 32, alpha=alpha, task_weighting="trace")
    fold_d = FoldedStats(8, 32, alpha=alpha, task_weighting="trace")
    for x, xe, w, b in zip(X, Xe, experts, b_e):
        s_c, s_d = TaskStats(32), TaskStats(32, with_expert=False, direct={"fc2": torch.cat([w, b[:, None]], 1)},
                                            alpha=alpha)
        for chunk, chunk_e in zip(x.split(100), xe.split(100)):
            s_c.add(chunk, chunk_e)
            s_d.add(chunk, chunk_e)
        assert s_d.C is None and torch.equal(s_c.G, s_d.G)
        xa, xea = (torch.cat([v, torch.ones(len(v), 1)], 1).double() for v in (x, xe))
        exact = torch.cat([w, b[:, None]], 1).double() @ (alpha * xea + (1 - alpha) * xa).T @ xa
        assert float((s_d.N["fc2"].double() - exact).norm() / exact.norm()) < 1e-6
        fold_c.add_task(s_c, w, b)
        fold_d.add_task(s_d, None, None, key="fc2")
    assert float((fold_d.N_task - fold_c.N_task).norm() / fold_c.N_task.norm()) < 1e-6
    a, b = solve_target(fold_c, W_m), solve_target(fold_d, W_m)
    assert torch.equal(a.H, b.H)
    assert float((a.W_star - b.W_star).norm() / (a.W_star - W_m).norm()) < 1e-4
    assert direct_pays(8, 32) and direct_pays(384, 1536) and not direct_pays(768, 768) and not direct_pays(3072, 768)


def test_direct_target_product_bad_inputs():
    W_m, experts, X, Xe = multitask_layer(T=1, d_out=8, d_in=32)
    with pytest.raises(EPMQError, match="fc2.*d_in \\+ 1 = 33"):
        TaskStats(32, direct={"fc2": experts[0]})  # not augmented
    s = TaskStats(32, with_expert=False, direct={"fc2": torch.cat([experts[0], torch.zeros(8, 1)], 1)}, alpha=0.5)
    with pytest.raises(EPMQError, match="expert inputs are required"):
        s.add(X[0])
    s.add(X[0], Xe[0])
    with pytest.raises(EPMQError, match="alpha=0.5.*expects 1.0"):
        FoldedStats(8, 32, alpha=1.0, task_weighting="none").add_task(s, None, key="fc2")
    bad = Xe[0].clone()
    bad[3, 1] = float("inf")
    with pytest.raises(EPMQError, match="lin \\(expert\\).*Inf"):
        s.add(X[0], bad, name="lin")


def test_expert_outputs_stand_in_for_expert_inputs():
    """``TaskStats.add(expert_outputs=...)`` with :meth:`TaskStats.expert_outputs` is bit for bit the product
    formed from the expert's inputs; only at alpha = 1, and the outputs must match the tokens."""
    W_m, experts, X, Xe = multitask_layer(T=1, d_out=8, d_in=32)
    V = torch.cat([experts[0], torch.randn(8, 1)], 1)
    for stats_dtype in ("fp32", "bf16"):
        a = TaskStats(32, with_expert=False, direct={"fc2": V}, stats_dtype=stats_dtype)
        b = TaskStats(32, with_expert=False, direct={"fc2": V}, stats_dtype=stats_dtype)
        for x, xe in zip(X[0].split(64), Xe[0].split(64)):
            a.add(x, xe)
            b.add(x, None, expert_outputs={"fc2": TaskStats.expert_outputs(xe, V, stats_dtype)})
        assert torch.equal(a.N["fc2"], b.N["fc2"]) and torch.equal(a.G, b.G)
    y = TaskStats.expert_outputs(Xe[0], V)
    with pytest.raises(EPMQError, match="fc2 expert outputs \\(255, 8\\) do not match \\(256 tokens"):
        TaskStats(32, with_expert=False, direct={"fc2": V}).add(X[0], None, expert_outputs={"fc2": y[1:]}, name="L")
    with pytest.raises(EPMQError, match="only at alpha = 1"):
        TaskStats(32, with_expert=False, direct={"fc2": V}, alpha=0.5).add(X[0], None, expert_outputs={"fc2": y})


def test_pooled_only_fold_is_gptqs_and_refuses_targets():
    """GPTQ's fold keeps the pooled Gram alone, bit for bit the one a full fold builds; asking it for an
    E-PMQ target is an error, not a silent zero target."""
    W_m, experts, X, Xe = multitask_layer(T=2, d_out=8, d_in=32)
    full = FoldedStats(8, 32, alpha=1.0, task_weighting="trace")
    pooled = FoldedStats(8, 32, alpha=1.0, task_weighting="trace", pooled_only=True)
    for x, xe, w in zip(X, Xe, experts):
        s = TaskStats(32)
        s.add(x, xe)
        full.add_task(s, w)
        pooled.add_task(s, None)
    assert torch.equal(full.G_pool, pooled.G_pool) and pooled.H_task is None and pooled.N_task is None
    with pytest.raises(EPMQError, match="pooled Hessian only"):
        pooled.add_task(s, experts[0], name="fc1")
    with pytest.raises(EPMQError, match="fc1: the statistics were folded for the pooled Hessian only"):
        solve_target(pooled, W_m, name="fc1")


def test_epmq_bad_inputs():
    W_m, experts, X, Xe = multitask_layer()
    with pytest.raises(EPMQError, match="expert 1 weight shape"):
        epmq_target(W_m, [experts[0], experts[1][:, :5], experts[2]], X, Xe, name="attn.in_proj")
    bad = [x.clone() for x in X]
    bad[2][0, 0] = float("nan")
    with pytest.raises(EPMQError, match="task 2.*NaN"):
        epmq_target(W_m, experts, bad, Xe)
    with pytest.raises(EPMQError, match="task_weighting"):
        epmq_target(W_m, experts, X, Xe, task_weighting="bogus")
    with pytest.raises(EPMQError, match="alpha"):
        epmq_target(W_m, experts, X, Xe, alpha=1.5)


def test_all_finite_fast_path_agrees_with_the_elementwise_test():
    """The sum shortcut of ``all_finite`` never passes a NaN/Inf, and finite values whose sum overflows are
    still finite; ``check_finite`` names the tensor and counts the bad values."""
    from epmq.errors import all_finite, check_finite

    x = torch.randn(64, 32)
    assert all_finite(x) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[7, 3] = bad
        assert not all_finite(y) and not all_finite(y.double())
    pair = x.clone()
    pair[0, 0], pair[0, 1] = float("inf"), -float("inf")  # the sum is NaN, not Inf
    assert not all_finite(pair)
    big = torch.full((4,), 3e38)  # float32 sum overflows to Inf, every value is finite
    assert not bool(torch.isfinite(big.sum())) and all_finite(big) and check_finite(big, "big") is big
    with pytest.raises(EPMQError, match=r"W: 2 non-finite value\(s\)"):
        check_finite(pair, "W")
