"""E-PMQ: expert-guided targets with merged-weight anchoring (METHOD.md section 3).

For one Linear with merged weight W_m (bias b_m), experts W_t (b_t) and, per task t, the layer inputs X_t in
the model being quantized and the expert's own inputs X^e_t (blended X~_t = alpha X^e_t + (1 - alpha) X_t):

    min_Q  sum_t w_t ||Q X_t - (W_t X~_t + b_t)||^2 + lam_out' ||(Q - W_m) X||^2 + lam_w' ||Q - W_m||^2

is quadratic in Q, so it equals tr((Q - W*) H (Q - W*)^T) + const with

    H  = sum_t w_t X_t X_t^T + lam_out' X X^T + lam_w' I
    W* = (sum_t w_t W_t X~_t X_t^T + lam_out' W_m X X^T + lam_w' W_m) H^-1

and E-PMQ is GPTQ run on (W*, H). Everything is computed from augmented statistics (a constant-1 row is
appended to the inputs), which carries the bias terms exactly:

* ``fit_bias=False`` (default): the bias stays b_m and the target accounts for b_t - b_m;
* ``fit_bias=True``: the bias is solved jointly; GPTQ then runs on the Schur complement of the bias row
  (the bias absorbs the mean error), and :meth:`EPMQTarget.refit_bias` gives the optimal bias for the
  rounded Q.

Relative anchor strengths (so one setting transfers across layers and models):
``lam_out' = lam_out * tr(H_task) / tr(X X^T)`` (lam_out = 1 gives the pooled anchor the same total weight
as the tasks) and ``lam_w' = lam_w * tr(H_task) / d_in`` (a ridge relative to the mean Hessian diagonal).
Task weights ``w_t``: ``"none"`` (1), ``"trace"`` (1 / tr(X_t X_t^T), each task the same share) or
``"tokens"`` (1 / n_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from epmq.errors import EPMQError, all_finite, check_finite
from epmq.precision import STATS_DTYPES, add_gram
from epmq.quant.result import layer_error

TASK_WEIGHTINGS = ("none", "trace", "tokens")
_SOLVE_FLOOR = 1e-8  # numerical ridge (relative to mean diag) when lam_w = 0 and H is singular


class TaskStats:
    """Streaming float32 statistics of one Linear on one task's calibration tokens.

    ``G = Xa Xa^T`` and ``C = Xa^e Xa^T`` over augmented inputs ``Xa = [X; 1]`` ((d_in + 1) x (d_in + 1));
    ``n`` tokens. ``C`` is None when no expert inputs were given (plain GPTQ needs ``G`` only). ``stats_dtype``
    (:data:`epmq.precision.STATS_DTYPES`): the precision the inputs are rounded to before the products; the
    sums are float32 either way (``"bf16"``: the statistics of the bf16-rounded inputs, i.e. what a bf16
    Linear sees; faster on CPUs with bf16 matmul hardware).

    ``direct`` (layer name -> the expert's augmented weight ``[W_t b_t]``, d_out x (d_in + 1)) accumulates
    each named layer's target product ``N_t = [W_t b_t] C~_t`` token by token instead, as ``Y^T Xa`` with the
    expert's outputs ``Y = X~a [W_t b_t]^T`` on the ``alpha``-blended inputs ``X~a = alpha Xa^e + (1 - alpha)
    Xa``. That costs ``2 n d_out d_in`` against ``n d_in^2`` for ``C`` plus ``d_out d_in^2`` for the fold, so
    it is cheaper whenever ``2 d_out <= d_in`` (an MLP's down projection: ``d_in = 4 d_out`` in a ViT);
    see :func:`direct_pays`. ``C`` is then not collected unless ``with_expert`` asks for it too.
    """

    def __init__(self, d_in: int, *, with_expert: bool = True, device=None, stats_dtype: str = "fp32",
                 direct: dict[str, torch.Tensor] | None = None, alpha: float = 1.0):
        if stats_dtype not in STATS_DTYPES:
            raise EPMQError(f"stats_dtype={stats_dtype!r}: expected one of {sorted(STATS_DTYPES)}")
        self.round_to = STATS_DTYPES[stats_dtype]
        self.d_in = d_in
        self.G = torch.zeros(d_in + 1, d_in + 1, device=device)
        self.C = torch.zeros(d_in + 1, d_in + 1, device=device) if with_expert else None
        self.direct = {}  # name -> expert's augmented weight (float32, on the statistics' device)
        self.N: dict[str, torch.Tensor] = {}
        for key, V in (direct or {}).items():
            if tuple(V.shape[1:]) != (d_in + 1,):
                raise EPMQError(f"{key}: augmented expert weight {tuple(V.shape)} does not take d_in + 1 = {d_in + 1}")
            self.direct[key] = V.to(device=self.G.device, dtype=torch.float32)
            self.N[key] = torch.zeros(V.shape[0], d_in + 1, device=self.G.device)
        self.alpha = alpha
        self.n = 0

    @staticmethod
    def _augment(x: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
        """``[x; 1]`` as float32 rows, the values first rounded to ``round_to`` (None: as they are)."""
        x = x.reshape(-1, x.shape[-1])
        if round_to is not None:
            x = x.to(round_to)
        x = x.float()
        return torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], dim=1)

    @classmethod
    def expert_outputs(cls, x_expert: torch.Tensor, V: torch.Tensor, stats_dtype: str = "fp32") -> torch.Tensor:
        """The outputs ``Xa^e [W_t b_t]^T`` (tokens x d_out) that :meth:`add` forms for a ``direct`` layer at
        ``alpha = 1``, bit for bit: a caller holding the expert's inputs only briefly (the engine's
        per-block cache) can keep these instead, d_out numbers a token instead of d_in."""
        return cls._augment(x_expert, STATS_DTYPES[stats_dtype]) @ V.float().T

    def add(self, x: torch.Tensor, x_expert: torch.Tensor | None = None, *, name: str = "inputs",
            expert_outputs: dict[str, torch.Tensor] | None = None) -> None:
        """Accumulate tokens ``x`` (..., d_in) and, aligned token by token, the expert's ``x_expert``.
        ``expert_outputs`` (``direct`` layer name -> :meth:`expert_outputs` of these tokens, ``alpha = 1`` only)
        stand in for ``x_expert`` for those layers; ``x_expert`` is then needed only if ``C`` is collected or a
        direct layer has no outputs given.

        A NaN/Inf anywhere in ``x`` or ``x_expert`` reaches the diagonal of ``G`` / ``C`` (x_i * x_i), so checking
        those d + 1 numbers after each batch catches it without a pass over the tokens."""
        if x.shape[-1] != self.d_in:
            raise EPMQError(f"{name}: inputs have d_in={x.shape[-1]}, the layer expects {self.d_in}")
        given = expert_outputs or {}
        if given and self.alpha != 1.0:
            raise EPMQError(f"{name}: expert outputs stand in for expert inputs only at alpha = 1 (alpha={self.alpha})")
        xa = self._augment(x, self.round_to)
        add_gram(self.G, xa, xa, self.round_to)
        if not bool(torch.isfinite(torch.diagonal(self.G)).all()):
            check_finite(x, name)  # names the culprit
            check_finite(torch.diagonal(self.G), name)  # overflow of finite inputs
        if self.C is not None or any(k not in given for k in self.direct):
            if x_expert is None:
                raise EPMQError(f"{name}: expert inputs are required for E-PMQ statistics")
            if x_expert.shape != x.shape:
                raise EPMQError(
                    f"{name}: expert inputs {tuple(x_expert.shape)} are not aligned with inputs {tuple(x.shape)}"
                )
            xe = self._augment(x_expert, self.round_to)
        if self.C is not None:
            add_gram(self.C, xe, xa, self.round_to)
            if not bool(torch.isfinite(torch.diagonal(self.C)).all()):
                check_finite(x_expert, f"{name} (expert)")  # names the culprit
                check_finite(torch.diagonal(self.C), f"{name} (expert)")
        if self.direct:
            xb = None
            for key, V in self.direct.items():
                if key in given:
                    Y = given[key]
                    if tuple(Y.shape) != (xa.shape[0], V.shape[0]):
                        raise EPMQError(f"{name}: {key} expert outputs {tuple(Y.shape)} do not match "
                                        f"({xa.shape[0]} tokens, d_out {V.shape[0]})")
                else:
                    if xb is None:
                        xb = xe if self.alpha == 1.0 else self.alpha * xe + (1 - self.alpha) * xa
                    Y = xb @ V.T
                N = self.N[key]
                N.addmm_(Y.T, xa)
                if not bool(torch.isfinite(N[:, -1]).all()):  # the bias column sums every output
                    if x_expert is not None:
                        check_finite(x_expert, f"{name} (expert)")
                    check_finite(N, f"{name} ({key} expert outputs)")
        self.n += xa.shape[0]

    @classmethod
    def from_tensors(cls, G: torch.Tensor, C: torch.Tensor | None, n: int) -> "TaskStats":
        s = cls(G.shape[0] - 1, with_expert=C is not None, device=G.device)
        s.G, s.C, s.n = G.float(), (None if C is None else C.float()), int(n)
        return s

    def trace(self) -> float:
        return float(torch.diagonal(self.G)[: self.d_in].sum())


def direct_pays(d_out: int, d_in: int) -> bool:
    """Whether :class:`TaskStats`' token-by-token target product (``2 n d_out d_in`` flops per task) beats
    ``C`` plus the fold (``n d_in^2 + d_out d_in^2``) for every token count ``n``: ``2 d_out <= d_in``."""
    return 2 * d_out <= d_in


def task_weight(stats: TaskStats, task_weighting: str, name: str = "task") -> float:
    if task_weighting == "none":
        return 1.0
    if task_weighting == "trace":
        tr = stats.trace()
        if not tr > 0:
            raise EPMQError(f"{name}: tr(X_t X_t^T) = {tr}; the task's inputs are all zero, cannot trace-weight")
        return 1.0 / tr
    if task_weighting == "tokens":
        if stats.n == 0:
            raise EPMQError(f"{name}: no calibration tokens")
        return 1.0 / stats.n
    raise EPMQError(f"task_weighting={task_weighting!r}: expected one of {TASK_WEIGHTINGS}")


class FoldedStats:
    """Running sums over tasks, so memory does not grow with the number of tasks.

    ``H_task = sum_t w_t G_t``, ``G_pool = sum_t G_t`` and ``N_task = sum_t w_t [W_t b_t] C~_t`` with
    ``C~_t = alpha C_t + (1 - alpha) G_t`` (all augmented, float64).
    """

    def __init__(self, d_out: int, d_in: int, *, alpha: float, task_weighting: str, device=None,
                 pooled_only: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise EPMQError(f"alpha={alpha}: must lie in [0, 1]")
        if task_weighting not in TASK_WEIGHTINGS:
            raise EPMQError(f"task_weighting={task_weighting!r}: expected one of {TASK_WEIGHTINGS}")
        self.alpha, self.task_weighting = alpha, task_weighting
        self.d_out, self.d_in = d_out, d_in
        self.pooled_only = pooled_only  # GPTQ's statistics: G_pool alone (H_task, N_task are None)
        kw = dict(dtype=torch.float64, device=device)
        self.G_pool = torch.zeros(d_in + 1, d_in + 1, **kw)
        self.H_task = None if pooled_only else torch.zeros(d_in + 1, d_in + 1, **kw)
        self.N_task = None if pooled_only else torch.zeros(d_out, d_in + 1, **kw)
        self.n_tasks = 0

    def add_task(self, stats: TaskStats, W_t: torch.Tensor | None, b_t: torch.Tensor | None = None, name="task",
                 *, key: str | None = None):
        """Fold one task. ``W_t``/``b_t`` (expert weight/bias) may be None for GPTQ-only statistics. When
        ``stats`` holds layer ``key``'s target product (``TaskStats(direct=...)``), that is folded and
        ``W_t``/``b_t`` are not needed (the product was formed from them)."""
        if self.pooled_only:
            if W_t is not None:
                raise EPMQError(f"{name}: these statistics are folded for the pooled Hessian only (no target)")
            self.G_pool += stats.G  # float32 into float64: exact, as adding stats.G.double()
            self.n_tasks += 1
            return
        G = stats.G.double()
        self.G_pool += G
        w = task_weight(stats, self.task_weighting, name)
        self.H_task += w * G
        if key is not None and key in stats.N:
            N = stats.N[key]
            if tuple(N.shape) != (self.d_out, self.d_in + 1):
                raise EPMQError(f"{name}: target product {tuple(N.shape)} != ({self.d_out}, {self.d_in + 1})")
            if stats.alpha != self.alpha:
                raise EPMQError(f"{name}: statistics blended with alpha={stats.alpha}, the fold expects {self.alpha}")
            self.N_task += w * N.double()
        elif W_t is not None:
            if stats.C is None:
                raise EPMQError(f"{name}: E-PMQ needs expert-input statistics (C), got GPTQ-only statistics")
            if tuple(W_t.shape) != (self.d_out, self.d_in):
                raise EPMQError(
                    f"{name}: expert weight shape {tuple(W_t.shape)} does not match merged ({self.d_out}, {self.d_in})"
                )
            check_finite(W_t, f"{name} (expert weight)")
            Ct = stats.C.double()
            if self.alpha != 1.0:  # (alpha = 1, the default: C as it is, the same bits)
                Ct = self.alpha * Ct + (1 - self.alpha) * G
            self.N_task += w * (augment_weight(W_t, b_t) @ Ct)
        self.n_tasks += 1


def augment_weight(W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[W b]`` (d_out x (d_in + 1)) in ``dtype``, a zero column when the layer has no bias."""
    b = torch.zeros(W.shape[0], dtype=dtype, device=W.device) if b is None else b.to(dtype)
    return torch.cat([W.to(dtype), b.reshape(-1, 1)], dim=1)


@dataclass
class EPMQTarget:
    """The solved continuous target and the Hessian GPTQ must round under.

    ``W_star`` (d_out x d_in, float32), ``H`` (d_in x d_in, float64). With a refitted bias, ``b_star`` and
    ``bias_coupling = Ha[:d, d] / Ha[d, d]`` give the optimal bias for any Q: ``b* - (Q - W*) coupling``.
    """

    W_star: torch.Tensor
    H: torch.Tensor
    b_star: torch.Tensor | None = None
    bias_coupling: torch.Tensor | None = None

    def refit_bias(self, Q: torch.Tensor) -> torch.Tensor | None:
        if self.b_star is None:
            return None
        return (self.b_star - (Q.double() - self.W_star.double()) @ self.bias_coupling).float()


def solve_target(
    folded: FoldedStats,
    W_m: torch.Tensor,
    b_m: torch.Tensor | None = None,
    *,
    lam_out: float = 0.0,
    lam_w: float = 1e-2,
    fit_bias: bool = False,
    name: str = "W",
) -> EPMQTarget:
    """Solve ``W*`` and ``H`` from folded statistics (see the module docstring for the formulas)."""
    if lam_out < 0 or lam_w < 0:
        raise EPMQError(f"{name}: anchor strengths must be >= 0 (lam_out={lam_out}, lam_w={lam_w})")
    if folded.n_tasks == 0:
        raise EPMQError(f"{name}: no task statistics were accumulated")
    if folded.pooled_only:
        raise EPMQError(f"{name}: the statistics were folded for the pooled Hessian only; E-PMQ needs the tasks'")
    d = folded.d_in
    check_finite(W_m, f"{name} (merged weight)")
    Vm = augment_weight(W_m, b_m)
    Ht, Gp = folded.H_task, folded.G_pool
    tr_task = float(torch.diagonal(Ht)[:d].sum())
    tr_pool = float(torch.diagonal(Gp)[:d].sum())
    if not (tr_task > 0 and tr_pool > 0):
        raise EPMQError(f"{name}: calibration inputs are all zero (tr H = {tr_task})")
    lo = lam_out * tr_task / tr_pool
    ridge_w = max(lam_w, _SOLVE_FLOOR) * tr_task / d
    R = torch.ones(d + 1, dtype=torch.float64, device=Ht.device)
    R[d] = 0.0  # no ridge on the bias
    Ha = Ht + lo * Gp + torch.diag(R * ridge_w)
    Na = folded.N_task
    if lo:  # (the default lam_out = 0 skips a d_out x d^2 float64 product)
        Na = Na + lo * (Vm @ Gp)
    Na = Na + Vm * (R * ridge_w)
    if fit_bias:
        V = _solve_right(Na, Ha, name)
        W_star, b_star = V[:, :d], V[:, d]
        coupling = Ha[:d, d] / Ha[d, d]
        H = Ha[:d, :d] - torch.outer(Ha[:d, d], Ha[d, :d]) / Ha[d, d]
        return EPMQTarget(W_star.float(), H, b_star, coupling)
    bm = Vm[:, d]
    N = Na[:, :d] - torch.outer(bm, Ha[d, :d])
    H = Ha[:d, :d]
    W_star = _solve_right(N, H, name)
    return EPMQTarget(W_star.float(), H)


def _solve_right(N: torch.Tensor, H: torch.Tensor, name: str) -> torch.Tensor:
    """N H^-1 for symmetric positive (semi)definite H, in float64."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        # positive semidefinite up to rounding: fall back to a least-squares solve
        X = torch.linalg.lstsq(H, N.T).solution.T
    else:
        X = torch.cholesky_solve(N.T, L).T
    if not all_finite(X):
        raise EPMQError(f"{name}: the E-PMQ target solve produced non-finite values (ill-conditioned Hessian)")
    return X


def epmq_target(
    W_merged: torch.Tensor,
    expert_weights: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | TaskStats],
    expert_inputs: Sequence[torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
    lam_out: float = 0.0,
    lam_w: float = 1e-2,
    task_weighting: str = "trace",
    merged_bias: torch.Tensor | None = None,
    expert_biases: Sequence[torch.Tensor | None] | None = None,
    name: str = "W",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The E-PMQ continuous target and Hessian for one Linear, so that E-PMQ is ``gptq(*epmq_target(...), bits)``.

    Args:
        W_merged: merged weight W_m (d_out x d_in).
        expert_weights: T expert weights W_t (each d_out x d_in).
        inputs: per task, either the layer's inputs X_t in the model being quantized as a tokens x d_in
            matrix, or accumulated :class:`TaskStats` (which already hold the expert inputs).
        expert_inputs: per task, the expert's own inputs (tokens x d_in, aligned with ``inputs``); required
            when ``inputs`` are matrices.
        alpha: blend of expert inputs (1 = the expert's own inputs, 0 = the quantized model's inputs).
        lam_out: output anchor to W_m on the pooled inputs (relative, see module docstring).
        lam_w: weight-space ridge anchor to W_m (relative to the mean Hessian diagonal).
        task_weighting: ``"none"``, ``"trace"`` or ``"tokens"``.
        merged_bias, expert_biases: biases, if the layer has them (kept fixed at ``merged_bias``).

    Returns:
        ``(W_star, H)``: float32 target and float64 Hessian.
    """
    T = len(expert_weights)
    if T == 0 or len(inputs) != T:
        raise EPMQError(f"{name}: got {T} expert weights but {len(inputs)} task inputs; need one per task (T >= 1)")
    d_out, d_in = W_merged.shape
    folded = FoldedStats(d_out, d_in, alpha=alpha, task_weighting=task_weighting, device=W_merged.device)
    for t, (W_t, x) in enumerate(zip(expert_weights, inputs)):
        if tuple(W_t.shape) != (d_out, d_in):
            raise EPMQError(f"{name}: expert {t} weight shape {tuple(W_t.shape)} != merged {(d_out, d_in)}")
        if isinstance(x, TaskStats):
            stats = x
        else:
            if expert_inputs is None or len(expert_inputs) != T:
                raise EPMQError(f"{name}: expert_inputs must give one matrix per task when inputs are matrices")
            stats = TaskStats(d_in, device=W_merged.device)
            stats.add(x, expert_inputs[t], name=f"{name} task {t}")
        b_t = None if expert_biases is None else expert_biases[t]
        folded.add_task(stats, W_t, b_t, name=f"{name} expert {t}")
    target = solve_target(folded, W_merged, merged_bias, lam_out=lam_out, lam_w=lam_w, name=name)
    return target.W_star, target.H


def objective(Q: torch.Tensor, target: EPMQTarget | tuple) -> float:
    """E-PMQ objective up to its constant: tr((Q - W*) H (Q - W*)^T) (weights only)."""
    W_star, H = (target.W_star, target.H) if isinstance(target, EPMQTarget) else target
    return layer_error(Q.double() - W_star.double(), H)
