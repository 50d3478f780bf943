"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", arXiv 2306.01708).

With task vectors τ_t = θ_t − θ₀ (t = 1…T):

1. **Trim**: keep the largest-magnitude entries of each τ_t, zero the rest:
   τ̂_t = τ_t · [|τ_t| ≥ c_t], where c_t is the r-th smallest |τ_t| entry, r = n − ⌊n · k/100⌋ over the n
   entries the threshold is taken over. This is the reference rule of the TIES code (and of AdaMerging and
   FusionBench, which copy it: ``kthvalue`` then ``>=``); it keeps ⌊n·k/100⌋ + 1 entries barring ties, and
   k = 100 keeps everything.
2. **Elect** a sign per entry: γ = sign(Σ_t τ̂_t). Entries where the sum is exactly 0 take the majority
   elected sign of the tensor (+1 if that is a tie too).
3. **Disjoint merge** over the experts that agree with γ, A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0}:
   ``merge_func="mean"``: τ_m = Σ_{t∈A} τ̂_t / max(|A|, 1);  ``merge_func="sum"``: τ_m = Σ_{t∈A} τ̂_t.
4. θ_m = θ₀ + λ τ_m.

Trim scope. ``trim_scope="global"`` (default) takes c_t over the task vector of the *whole* model (all merged
tensors of task t flattened into one vector), which is what FusionBench and AdaMerging do
(``state_dict_to_vector`` over the state dict, then ``kthvalue`` per task row). ``trim_scope="tensor"``
takes c_t over each tensor separately (mergekit-style). Global trimming needs the thresholds before any
tensor is merged: :func:`global_thresholds` finds them exactly, streaming, in two passes over the model
with O(T · 2¹⁶) memory (radix selection on the float32 bit patterns of |τ|, see there), and the driver
passes them to :func:`ties` as ``thresholds``.

Defaults (the FusionBench / AdaMerging variant, whose CLIP ViT-B/32 reference row METHOD.md quotes):
k = 20 (%), λ = 0.3, global trim, ``merge_func="sum"`` (their "dis-sum"). The TIES paper's disjoint
*mean* (``merge_func="mean"``) was tuned with λ near 1; at λ = 0.3 it shrinks the merged task vector.

Deviation from FusionBench in global scope: its zero-sum tie-break (step 2) uses the majority sign of the
whole model, ours that of the tensor; the two differ only on entries whose surviving trimmed values cancel
exactly. With ``dare_p > 0`` the task vectors are DARE-sparsified before trimming, as in FusionBench's
DARE-TIES.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from epmq.errors import EPMQError
from epmq.merge.base import MergeMethod, check_choice, iter_task_vectors, mix_seed

if TYPE_CHECKING:
    import torch

    from epmq.merge.base import Loader

MERGE_FUNCS = ("mean", "sum")
TRIM_SCOPES = ("global", "tensor")


def check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 100.0:
        raise EPMQError(f"k={k!r} is out of range: expected the kept percentage in (0, 100]")
    return float(k)


def trim_rank(n: int, k: float) -> int:
    """1-based rank r of the threshold among n ascending magnitudes (0: keep everything)."""
    return n - int(n * (check_k(k) / 100))


def ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    k: float = 20.0,
    lam: float = 0.3,
    merge_func: str = "sum",
    trim_scope: str = "global",
    thresholds: Sequence[float] | None = None,
    dare_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """TIES-merge one tensor; returns θ₀ + λ τ_m in float32.

    ``thresholds`` are the per-task magnitude thresholds c_t of ``trim_scope="global"``, one per expert, from
    :func:`global_thresholds` (:func:`epmq.merge.merge_state_dicts` computes and passes them).
    """
    import torch

    check_choice(merge_func, "merge_func", MERGE_FUNCS)
    check_choice(trim_scope, "trim_scope", TRIM_SCOPES)
    n_tasks = len(experts)
    if trim_scope == "tensor":
        if thresholds is not None:
            raise EPMQError("thresholds: only used with trim_scope='global', got trim_scope='tensor'")
    else:
        check_k(k)
        if thresholds is None or len(thresholds) != n_tasks:
            raise EPMQError(
                f"thresholds={thresholds!r}: trim_scope='global' needs one threshold per expert "
                f"({n_tasks}) from global_thresholds(); merge_state_dicts computes them"
            )
    # One (T, n) float32 buffer, filled by one pass over the experts and then trimmed and masked row by row
    # in place: T + a few tensors of this key's size, not ~5 T. Every step is the elementwise operation (or,
    # for the sums over tasks, the same reduction over the same (T, n) tensor) of the vectorised form
    #   trimmed = τ · [|τ| ≥ c];  γ = sign(Σ_t trimmed);  merged = Σ_t trimmed · agree,
    # so the result is that form's bit for bit.
    taus, t = None, 0
    for tau in iter_task_vectors(base, experts, dare_p=dare_p, seed=seed):
        if taus is None:
            taus = torch.empty((n_tasks, tau.numel()), dtype=torch.float32, device=tau.device)
        taus[t] = tau.reshape(-1)
        del tau
        t += 1
    if trim_scope == "tensor":
        rank = trim_rank(taus.shape[1], k)
        cut = [row.abs().kthvalue(rank).values if rank else None for row in taus]
    else:
        cut = torch.tensor(thresholds, dtype=torch.float32, device=taus.device)
    for t, row in enumerate(taus):  # trim
        if cut[t] is not None:
            row.mul_(row.abs() >= cut[t])

    elected = torch.sign(taus.sum(dim=0))
    elected[elected == 0] = 1.0 if elected.sum() >= 0 else -1.0
    positive = elected > 0
    del elected
    count = torch.zeros(taus.shape[1], dtype=torch.int64, device=taus.device) if merge_func == "mean" else None
    for row in taus:  # disjoint: keep the entries that agree with the elected sign
        agree = torch.where(positive, row > 0, row < 0)
        row.mul_(agree)
        if count is not None:
            count += agree
        del agree
    merged = taus.sum(dim=0)
    del taus
    if count is not None:
        merged /= count.clamp(min=1)
    return merged.mul_(lam).reshape(base.shape).add_(base.float())  # = θ₀ + λ τ_m bit for bit


def global_thresholds(
    load: Loader, keys: Sequence[str], *, k: float = 20.0, dare_p: float = 0.0, seed: int = 0
) -> list[float]:
    """Exact per-task trim thresholds c_t over all ``keys`` together (``trim_scope="global"``), streaming.

    The r-th smallest |τ_t| entry of the whole model (r as in :func:`trim_rank`) is found by radix selection:
    |τ| ≥ 0, so its float32 bit pattern, read as an int32, sorts like its value. Pass 1 histograms the high 16
    bits of every entry (2¹⁵ buckets, the sign bit being 0) and locates the bucket holding rank r; pass 2
    histograms the low 16 bits of the entries in that bucket, which pins the exact value. Memory is
    O(T · 2¹⁶) counts plus one task vector at a time; every tensor is read twice. ``load(key)`` returns
    the (base, experts) tensors of one key; ``seed`` is re-derived per key exactly as the driver does for
    :func:`ties`, so DARE draws the same masks here and in the merge.
    """
    import torch
    from tqdm import tqdm

    def abs_bits(desc: str):
        """Per key, a generator of the T flattened int32 bit patterns of |τ_t|, one task at a time (each
        released before the next task vector is formed)."""
        for key in tqdm(keys, desc=desc, unit="tensor", disable=None):
            base, experts = load(key)
            yield one_by_one(iter_task_vectors(base, experts, dare_p=dare_p, seed=mix_seed(seed, key)))
            del base, experts

    def one_by_one(taus):
        for tau in taus:
            bits = tau.abs().flatten().view(torch.int32)
            del tau
            yield bits
            del bits

    def locate(counts: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the bin holding the ``ranks``-th smallest entry and the number of entries in lower bins."""
        cumulative = counts.cumsum(dim=1)
        bins = torch.searchsorted(cumulative, ranks.reshape(-1, 1))
        return bins.reshape(-1), (cumulative - counts).gather(1, bins).reshape(-1)

    check_k(k)
    high = None
    for per_task in abs_bits("ties: global trim, pass 1/2"):
        counts = []
        for bits in per_task:
            counts.append(torch.bincount(bits >> 16, minlength=1 << 15))
            del bits
        counts = torch.stack(counts)
        high = counts if high is None else high + counts
    if high is None:
        raise EPMQError("keys: no tensor to merge, so there is no task vector to trim")
    n_tasks, rank = len(high), trim_rank(int(high[0].sum()), k)
    if rank == 0:
        return [0.0] * n_tasks
    ranks = torch.full((n_tasks,), rank, device=high.device)
    bucket, below = locate(high, ranks)

    low = high.new_zeros(n_tasks, 1 << 16)
    for per_task in abs_bits("ties: global trim, pass 2/2"):
        t = 0
        for bits in per_task:
            low[t] += torch.bincount(bits[(bits >> 16) == bucket[t]] & 0xFFFF, minlength=1 << 16)
            del bits
            t += 1
    offset, _ = locate(low, ranks - below)
    return ((bucket << 16) | offset).to(torch.int32).view(torch.float32).tolist()


def prepare_ties(load: Loader, keys: Sequence[str], hparams: dict[str, Any]) -> dict[str, Any]:
    """Driver hook: with ``trim_scope="global"``, add the whole-model ``thresholds`` to the hyperparameters."""
    if check_choice(hparams["trim_scope"], "trim_scope", TRIM_SCOPES) == "tensor":
        return hparams
    thresholds = global_thresholds(load, keys, k=hparams["k"], dare_p=hparams["dare_p"], seed=hparams["seed"])
    return {**hparams, "thresholds": thresholds}


PAPER = "TIES-Merging: Resolving Interference When Merging Models, https://arxiv.org/abs/2306.01708"
DEFAULTS = {"k": 20.0, "lam": 0.3, "merge_func": "sum", "trim_scope": "global", "dare_p": 0.0, "seed": 0}

TIES = MergeMethod(
    name="ties",
    fn=ties,
    paper=PAPER,
    description="trim each τ_t to its top-k% magnitudes, elect a sign per entry, disjoint mean/sum "
    "over agreeing experts, θ₀ + λ τ_m",
    defaults=DEFAULTS,
    prepare=prepare_ties,
    label="TIES",
)

#: TIES on DARE-sparsified task vectors (FusionBench's DARE-TIES); ``dare_p=0`` gives back TIES bit for bit
DARE_TIES = MergeMethod(
    name="dare_ties",
    fn=ties,
    paper=f"Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
    f"https://arxiv.org/abs/2311.03099; {PAPER}",
    description="TIES-Merging on DARE-sparsified task vectors (drop with prob. p, rescale 1/(1−p))",
    defaults={**DEFAULTS, "dare_p": 0.5},
    prepare=prepare_ties,
    label="DARE + TIES",
)
