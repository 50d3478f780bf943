"""The layer-wise calibration engine: walk the blocks in forward order, capture every quantizable weight's
inputs with hooks (in the partially quantized model and in each expert), quantize in true-sequential groups,
and re-run the block to propagate.

Two propagation modes:

``sequential`` (default, faithful to GPTQ and METHOD.md section 3)
    The inputs X_t of a layer come from the model whose earlier layers are already quantized, so the
    statistics depend on the quantizer and the bit width: they are recomputed inside :func:`quantize_model`
    for every (method, bits, ...) and never shared. The calibrate-collect artefact then holds only what is
    quantizer-independent: the calibration batches themselves.

``fp``
    All statistics come from the full-precision merged model and the experts. They do not depend on the
    quantizer, so :func:`collect_stats` computes them once, they are saved (:func:`save_stats`), and every
    quantizer, bit width and hyperparameter reuses them (:func:`quantize_model` with ``stats=``).

Expert inputs always come from the expert's own blocks in full precision (the expert is never quantized).

Encoder-decoders (an adapter with several ``stacks``, T5): the blocks are walked stack after stack. At the
first block of a later stack (the decoder) its inputs are captured again by running the whole model -- the
one being quantized with its earlier stacks already quantized, and each expert with its full state -- so the
decoder's inputs, ``encoder_hidden_states`` included, come from the quantized encoder (sequential) or the
expert's own encoder. Padding is masked per stack (encoder tokens, decoder target positions) and per site
(cross-attention k/v read encoder positions).

Memory: statistics and hidden states are kept for the current block only; experts may be lazy state-dict
mappings (e.g. safetensors) and only one expert block is materialised at a time. ``act_dtype`` (bf16/fp16)
stores the propagated hidden states (``args[0]`` of every kept block call, the model's and each expert's) in
half precision between blocks, half their memory; they are cast back to float32 when a block runs on them,
and the statistics stay float32. Other tensors of a call (masks, position biases, T5's
``encoder_hidden_states``) are kept as they are.

Passes: a group's pass stops as soon as its inputs are captured, each expert block runs once per block
(``EXPERT_CACHE_MB``), and a sub-module whose sites are all quantized is not recomputed by the block's later
passes over the same calibration call (:class:`_Reuse`, ``REUSE_CACHE_MB``; validity tracked from the forward
order, bit-identical weights, tested): BERT's attention runs once for the FFN's two groups and the
propagation instead of three times (minilm GPTQ quantize 9.0 -> 6.9 s).

E-PMQ's target product ``[W_t b_t] C~_t`` of a layer with ``2 d_out <= d_in`` (an MLP's down projection:
``c_proj``, BERT's ``output.dense``, T5's ``wo``) is accumulated token by token from the expert's outputs on
the captured inputs (``TaskStats(direct=...)``, :func:`epmq.quant.target.direct_pays`) instead of collecting
``C_t`` and folding it with a float64 ``d_out x d_in^2`` product per task: ``2 n d_out d_in`` flops against
``n d_in^2 + d_out d_in^2``, the same numbers up to float32 summation order (tested). The per-block expert
cache then keeps those layers' expert outputs instead of their inputs (``d_out`` numbers a token instead of
``d_in``; same bits, tested). GPTQ's fold keeps only the pooled Gram (``FoldedStats(pooled_only=True)``).

Precision: ``forward_dtype`` runs the block forwards under autocast; ``stats_dtype="bf16"`` rounds the captured
layer inputs to bf16 before the Gram products ``G``/``C`` (:func:`epmq.precision.add_gram`), which are still
accumulated and kept in float32 -- on CPUs with bf16 matmul hardware the statistics update is 1.2-2.0x faster
(``bench/grams_bench.py``); on CUDA the products run as TF32 GEMMs, exact on bf16 values (not yet timed).
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager, nullcontext
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from epmq.errors import EPMQError, check_finite
from epmq.models.adapters import Adapter, Site, get_adapter
from epmq.precision import DTYPES, STATS_DTYPES, autocast
from epmq.quant import METHODS, QuantMethod
from epmq.quant.result import QuantResult
from epmq.quant.target import FoldedStats, TaskStats, augment_weight, direct_pays

__all__ = ["QuantConfig", "QuantizeReport", "quantize_model", "collect_stats", "save_stats", "load_stats"]


@dataclass
class QuantConfig:
    """Every knob of one quantization run (what the workflow's ``params:`` carry)."""

    method: str = "epmq"
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    alpha: float = 1.0
    lam_out: float = 0.0
    lam_w: float = 1e-2
    task_weighting: str = "trace"
    fit_bias: bool = False
    propagation: str = "sequential"
    forward_dtype: str = "fp32"  # dtype of the block forwards (autocast); statistics stay float32
    act_dtype: str = "fp32"  # dtype the propagated hidden states are stored in between blocks (bf16/fp16: half)
    stats_dtype: str = "fp32"  # layer inputs rounded to this before the Gram products (sums stay float32)

    def __post_init__(self):
        if self.method not in METHODS:
            raise EPMQError(f"method={self.method!r}: expected one of {sorted(METHODS)}")
        if self.propagation not in ("sequential", "fp"):
            raise EPMQError(f"propagation={self.propagation!r}: expected 'sequential' or 'fp'")
        _named_dtype("forward_dtype", self.forward_dtype)
        _named_dtype("act_dtype", self.act_dtype)
        _named_dtype("stats_dtype", self.stats_dtype)

    @property
    def spec(self) -> QuantMethod:
        return METHODS[self.method]


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: results per quantized parameter (full state-dict name) and a log row
    per layer (seconds, errors)."""

    results: dict[str, QuantResult] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------ model / expert plumbing


class _StopForward(Exception):
    pass


#: largest total size (MiB) of one block's captured expert inputs kept in memory; beyond it, each group
#: re-runs the expert blocks instead (same numbers up to BLAS summation order, more compute). The environment
#: variable ``EPMQ_EXPERT_CACHE_MB`` overrides it (see :func:`cache_budget_mb`)
EXPERT_CACHE_MB = 4096


def cache_budget_mb(name: str) -> int:
    """The engine's memory-for-speed budget ``name`` (``"EXPERT_CACHE_MB"`` / ``"REUSE_CACHE_MB"``): the
    environment variable ``EPMQ_<name>`` if set (an integer >= 0), else the module constant. Neither changes
    what is computed beyond float summation order, so they are not part of a job's parameters."""
    env = f"EPMQ_{name}"
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return globals()[name]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise EPMQError(f"{env}={raw!r}: expected a whole number of MiB >= 0")
    return value


@dataclass
class _Call:
    """One captured block call: positional args and kwargs, hidden state in ``args[0]``; ``tokens`` (B, T) bool
    marks the real (non-padding) positions, None when all are real; ``masks``: further named masks of the
    stack (:attr:`Site.tokens`; T5's decoder: ``"encoder"``), None for single-stack adapters."""

    args: tuple
    kwargs: dict
    tokens: torch.Tensor | None = None
    masks: dict | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0]

    def with_hidden(self, h: torch.Tensor) -> "_Call":
        return _Call((h, *self.args[1:]), self.kwargs, self.tokens, self.masks)

    def real(self, x: torch.Tensor, name: str, which: str | None = None) -> torch.Tensor:
        """The rows of a captured layer input ``x`` (B, T, d) at real token positions: (N, d). ``which`` names
        another mask of the call (a site's ``tokens``) for inputs that are not the block's own positions."""
        tokens = self.tokens if which is None else (self.masks or {}).get(which)
        if tokens is None:
            return x
        if tuple(x.shape[:2]) != tuple(tokens.shape):
            raise EPMQError(f"{name}: input of shape {tuple(x.shape)} does not match the batch's token mask "
                            f"{tuple(tokens.shape)} (batch-first (B, T, d) expected)")
        return x[tokens]


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, adapter: Adapter, batches, device, dtype: torch.dtype | None = None,
    stack: int = 0, store: torch.dtype | None = None,
) -> list[_Call]:
    """Run ``model`` on every batch up to ``block`` (the first block of stack ``stack``) and keep its calls
    (their hidden states in ``store``, see :func:`_keep`)."""
    calls: list[_Call] = []
    tokens = [(None, None)]

    def hook(_mod, args, kwargs):
        if not args:  # hidden state passed by keyword
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            kwargs = dict(kwargs)
            args = (kwargs.pop(key),)
        calls.append(_keep(_Call(tuple(args), dict(kwargs), *tokens[0]), store))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = _to(batch, device)
            tokens[0] = adapter.stack_masks(batch, stack)
            try:
                with autocast(device, dtype):
                    adapter.run(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        what = "the first block" if stack == 0 else f"the first block of stack {stack}"
        raise EPMQError(f"{what} ran {len(calls)} times for {len(batches)} calibration batches")
    return calls


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


FORWARD_DTYPES = DTYPES  # statistics are accumulated in float32 whatever the forward dtype
#: ``act_dtype`` name -> dtype the propagated hidden states are stored in between blocks (None: as computed)
ACT_DTYPES = DTYPES
_DTYPE_KNOBS = {"forward_dtype": FORWARD_DTYPES, "act_dtype": ACT_DTYPES, "stats_dtype": STATS_DTYPES}


def _named_dtype(knob: str, name: str) -> torch.dtype | None:
    """The dtype a ``forward_dtype`` / ``act_dtype`` / ``stats_dtype`` name stands for (None: float32, no
    cast); a clear error naming the knob otherwise."""
    table = _DTYPE_KNOBS[knob]
    if name not in table:
        raise EPMQError(f"{knob}={name!r}: expected one of {sorted(table)}")
    return table[name]


def _keep(call: _Call, store: torch.dtype | None) -> _Call:
    """``call`` as kept between blocks: its hidden state cast to ``store`` (None: unchanged, no cast)."""
    if store is None or not call.hidden.is_floating_point() or call.hidden.dtype == store:
        return call
    return call.with_hidden(call.hidden.to(store))


def _use(call: _Call, store: torch.dtype | None) -> _Call:
    """A kept ``call`` ready to run: a hidden state stored in ``store`` back in float32 (None: unchanged)."""
    if store is None or call.hidden.dtype != store:
        return call
    return call.with_hidden(call.hidden.float())


def _run_block(block: nn.Module, call: _Call, dtype: torch.dtype | None = None) -> torch.Tensor:
    with autocast(call.hidden.device, dtype):
        out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _next_call(adapter: Adapter, block: nn.Module, call: _Call, dtype: torch.dtype | None = None) -> _Call:
    """Run ``block`` on ``call``; the call of the next block (``adapter.advance`` where more than the hidden
    state changes from block to block)."""
    if adapter.advance is None:
        return call.with_hidden(_run_block(block, call, dtype))
    with autocast(call.hidden.device, dtype):
        out = block(*call.args, **call.kwargs)
    args, kwargs = adapter.advance(call.args, call.kwargs, out)
    return _Call(tuple(args), dict(kwargs), call.tokens, call.masks)


def _state_dict_of(expert) -> Mapping[str, torch.Tensor]:
    return expert.state_dict() if isinstance(expert, nn.Module) else expert


def _load_from(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str, who: str,
               skip: tuple[str, ...] = ()) -> None:
    """Copy ``sd[prefix + name]`` into every parameter and buffer of ``module`` (names starting with one of
    ``skip`` left as they are)."""
    seen: set[int] = set()
    with torch.no_grad():
        for k, p in module.state_dict(keep_vars=True).items():
            key = prefix + k
            if id(p) in seen or (skip and key.startswith(skip)):
                continue  # a tied weight (T5's embed_tokens = shared) is loaded under its first name
            seen.add(id(p))
            try:
                src = sd[key]
            except KeyError:
                raise EPMQError(f"{who}: missing key {key!r}") from None
            if tuple(src.shape) != tuple(p.shape):
                raise EPMQError(f"{who}: {key!r} has shape {tuple(src.shape)}, the model expects {tuple(p.shape)}")
            p.data.copy_(src.to(p.device, p.dtype))


class _Capture:
    """Hooks that record the inputs of a group's sites during one block call (by input key)."""

    def __init__(self, sites: Sequence[Site], *, stop: bool = False, reuse: "_Reuse | None" = None):
        self.sites = sites
        self.inputs: dict[str, torch.Tensor] = {}
        self._busy = False
        self._reuse = reuse
        # stop: end the block call (raise _StopForward) as soon as every wanted input is captured, so a group
        # early in the block does not pay for the rest of it
        self._stop_after = {s.input_key for s in sites} if stop else None

    def _store(self, key: str, x: torch.Tensor) -> None:
        self.inputs[key] = x.detach()
        if self._stop_after is not None and self._stop_after.issubset(self.inputs):
            raise _StopForward

    def __enter__(self):
        self.handles = []
        for s in self.sites:
            if s.kind == "linear":
                self.handles.append(s.owner.register_forward_pre_hook(self._linear_hook(s.input_key)))
            elif s.kind == "mha_in":
                self.handles.append(s.owner.register_forward_pre_hook(self._mha_in_hook(s), with_kwargs=True))
            elif s.kind == "mha_out":
                mha = _parent_mha(s)
                self.handles.append(mha.register_forward_pre_hook(self._mha_out_hook(s, mha), with_kwargs=True))
            else:
                raise EPMQError(f"{s.name}: unknown site kind {s.kind!r}")
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _linear_hook(self, key):
        def hook(_mod, args):
            self._store(key, args[0])

        return hook

    def _mha_in_hook(self, site):
        def hook(_mod, args, kwargs):
            if self._busy:
                return
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
            if not (k is q and v is q):
                raise EPMQError(f"{site.name}: fused in_proj capture needs self-attention (query is key is value)")
            self._store(site.input_key, q)

        return hook

    def _mha_out_hook(self, site, mha):
        def hook(_mod, args, kwargs):
            if self._busy:
                return
            eye = torch.eye(mha.embed_dim, device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
            params = {"out_proj.weight": eye}
            if mha.out_proj.bias is not None:
                params["out_proj.bias"] = torch.zeros_like(mha.out_proj.bias)
            self._busy = True
            try:
                with self._reuse.paused() if self._reuse is not None else nullcontext():
                    ctx = torch.func.functional_call(mha, params, args, kwargs)[0]
            finally:
                self._busy = False
            self._store(site.input_key, ctx)

        return hook


def _parent_mha(site: Site) -> nn.MultiheadAttention:
    mha = getattr(site.owner, "_epmq_parent_mha", None)
    if mha is None:
        raise EPMQError(f"{site.name}: mha_out site without its parent nn.MultiheadAttention")
    return mha


def _link_mha_parents(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention):
            object.__setattr__(m.out_proj, "_epmq_parent_mha", m)


#: largest total size (MiB) of the sub-module outputs one block keeps for its later true-sequential passes
#: (:class:`_Reuse`); beyond it, further outputs are recomputed (same numbers, more compute). 0: no reuse.
#: The environment variable ``EPMQ_REUSE_CACHE_MB`` overrides it
REUSE_CACHE_MB = 2048


def _tensors(x) -> list[torch.Tensor]:
    """The tensors of a module output (tuples, lists and dicts walked)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _versions(ts: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in ts)  # bumped by every in-place operation on the tensor


class _Reuse:
    """Sub-module outputs of one block, kept for the block's later passes over the same calibration call.

    True-sequential quantization runs a block once per group of sites (each pass sees the earlier groups
    quantized, and stops where the group's inputs are captured) and once more to propagate. A sub-module whose
    sites are all quantized already computes, in every later pass over the same block input, exactly what it
    computed before -- nothing upstream of it changes any more -- so those passes read its output instead
    (BERT: the attention sub-module runs once for the FFN's two groups and the propagation, not three times).

    Validity is tracked, not assumed: modules are numbered in the order the forward first enters them, and a
    written site invalidates every kept output whose module ended at or after the site's position (the site is
    upstream of it or inside it). Only modules holding at least one site are wrapped (the expensive ones);
    one called twice in a block call is never reused; a kept output that was changed in place since (its
    tensors' version counters moved) is dropped, not read; ``REUSE_CACHE_MB`` bounds the memory. Calls are
    keyed by the caller (:meth:`calling`): the same key must mean the same block input.
    """

    def __init__(self, block: nn.Module, sites: Sequence[Site]):
        names = {s.name for s in sites}
        self.budget = cache_budget_mb("REUSE_CACHE_MB") * 2**20
        self.inside: dict[int, frozenset[str]] = {}  # wrapped module -> names of the sites it holds
        self.paths: dict[int, str] = {}
        self.order: dict[int, int] = {}  # module -> number of its first entry
        self.end: dict[int, int] = {}  # module -> highest number entered before its first return
        self.written: set[str] = set()
        self.kept: dict[tuple[int, object], tuple] = {}  # (module, key) -> (output, its tensors, versions, bytes)
        self.size = 0
        self.hits = 0
        self.shared: set[int] = set()  # modules called more than once in one block call: never reused
        self._key = None
        self._entered: set[int] = set()  # modules entered during the current block call
        self._modules: list[nn.Module] = []
        self._handles = []
        for path, mod in block.named_modules():
            if not path:
                continue
            inside = frozenset(n for n in names if n.startswith(path + "."))
            if inside and "forward" not in mod.__dict__:
                self.inside[id(mod)], self.paths[id(mod)] = inside, path
                mod.forward = self._wrap(mod, mod.forward)
                # numbered on entry, before any capture hook can end the call (prepend)
                self._handles.append(mod.register_forward_pre_hook(self._number, prepend=True))
                self._modules.append(mod)

    def _number(self, mod, _args) -> None:
        if self._key is not None and id(mod) not in self.order:
            self.order[id(mod)] = len(self.order)

    def close(self) -> None:
        for mod in self._modules:
            mod.__dict__.pop("forward", None)
        for h in self._handles:
            h.remove()
        self._modules, self._handles, self.kept, self.size = [], [], {}, 0

    @contextmanager
    def calling(self, key):
        """Context of one block call with input ``key``."""
        self._key, self._entered = key, set()
        try:
            yield
        finally:
            self._key = None

    @contextmanager
    def paused(self):
        """Calls inside run plainly (the mha_out capture's functional call with a stand-in out_proj)."""
        key, self._key = self._key, None
        try:
            yield
        finally:
            self._key = key

    def _wrap(self, mod: nn.Module, forward):
        mid = id(mod)

        def wrapped(*args, **kwargs):
            key = self._key
            if key is None:  # outside a keyed call, or paused: plain
                return forward(*args, **kwargs)
            if mid in self._entered:
                self.shared.add(mid)
                self._drop_module(mid)
                return forward(*args, **kwargs)
            self._entered.add(mid)
            hit = self.kept.get((mid, key))
            if hit is not None:
                out, ts, versions, _ = hit
                if _versions(ts) == versions:
                    self.hits += 1
                    return out
                self._drop((mid, key))  # changed in place downstream: recompute
            out = forward(*args, **kwargs)
            if mid not in self.end:
                self.end[mid] = len(self.order) - 1
            if mid not in self.shared and self.inside[mid] <= self.written:
                self._keep(mid, key, out)
            return out

        return wrapped

    def _keep(self, mid: int, key, out) -> None:
        path = self.paths[mid] + "."
        for k in [k for k in self.kept if k[1] == key and self.paths[k[0]].startswith(path)]:
            self._drop(k)  # an enclosing module's output makes its parts' outputs unnecessary
        ts = _tensors(out)
        n = sum(t.numel() * t.element_size() for t in ts)
        if self.size + n > self.budget:
            return
        self.kept[(mid, key)] = (out, ts, _versions(ts), n)
        self.size += n

    def _drop(self, k) -> None:
        self.size -= self.kept.pop(k)[3]

    def _drop_module(self, mid: int) -> None:
        for k in [k for k in self.kept if k[0] == mid]:
            self._drop(k)

    def _position(self, site: Site) -> int | None:
        """Number of the site's module, or of its closest numbered enclosing module (an MHA's out_proj is used
        functionally, never called); None when nothing holding it ran."""
        best = None
        for mid, inside in self.inside.items():
            if site.name in inside and mid in self.order:
                if best is None or len(self.paths[mid]) > len(self.paths[best]):
                    best = mid
        return None if best is None else self.order[best]

    def wrote(self, site: Site) -> None:
        """``site``'s weight changed: forget every output that depended on it."""
        self.written.add(site.name)
        pos = self._position(site)
        for k in list(self.kept):
            if pos is None or self.end.get(k[0], -1) >= pos:
                self._drop(k)


# ------------------------------------------------------------------ the engine


@dataclass
class _Streams:
    """Per task: the calls into the current block for the model being quantized and for the expert."""

    model: list[list[_Call]]
    expert: list[list[_Call]] | None


class _Engine:
    def __init__(self, model, calib, experts, adapter, device, progress, desc, forward_dtype="fp32",
                 act_dtype="fp32", stats_dtype="fp32"):
        self.dtype = _named_dtype("forward_dtype", forward_dtype)
        _named_dtype("stats_dtype", stats_dtype)
        self.stats_dtype = stats_dtype
        #: storage dtype of the hidden states kept between blocks (None: as computed)
        self.store = _named_dtype("act_dtype", act_dtype)
        self.act_dtype = act_dtype
        self.model = model
        self.adapter = adapter if isinstance(adapter, Adapter) else get_adapter(model, adapter)
        self.device = torch.device(device) if device else _default_device()
        self.calib = calib
        self.experts = None if experts is None else [_state_dict_of(e) for e in experts]
        if self.experts is not None and calib and len(self.experts) != len(calib):
            raise EPMQError(f"{len(self.experts)} experts but {len(calib)} calibration tasks: need one per task")
        self.progress, self.desc = progress, desc
        stacks = self.adapter.find_stacks(model)
        self.blocks = [b for stack in stacks for b in stack]
        #: block index -> stack number, for the first block of every stack (one stack: {0: 0})
        self.stack_starts: dict[int, int] = {}
        for s, stack in enumerate(stacks):
            self.stack_starts[sum(len(x) for x in stacks[:s])] = s
        for _, b in self.blocks:
            _link_mha_parents(b)

    def streams(self) -> _Streams:
        """Capture the inputs of the first block for every task, in the model and in each expert."""
        model = self.model.eval().to(self.device)
        first = self.blocks[0][1]
        with torch.no_grad():
            mine = [_capture_block_inputs(model, first, self.adapter, b, self.device, self.dtype, store=self.store)
                    for b in self.calib]
            theirs = None
            if self.experts is not None:
                work = copy.deepcopy(model)
                work_first = self.adapter.find_blocks(work)[0][1]
                # the forward stops at the first block, so the blocks' weights are not loaded here (expert_block
                # loads one block at a time): each expert's stem is read (ViT-L/14: 7 MB), not all of it (1.2 GB)
                blocks = tuple(prefix for prefix, _ in self.blocks)
                theirs = []
                for t, (sd, batches) in enumerate(zip(self.experts, self.calib)):
                    _load_from(work, sd, "", f"expert {t}", skip=blocks)
                    theirs.append(_capture_block_inputs(work, work_first, self.adapter, batches, self.device,
                                                        self.dtype, store=self.store))
                self.work = work
        return _Streams(mine, theirs)

    def starts_stack(self, idx: int) -> bool:
        """Whether block ``idx`` opens a stack after the first (T5: the decoder's first block)."""
        return idx > 0 and idx in self.stack_starts

    def enter_stack(self, idx: int, streams: _Streams, with_expert: bool) -> None:
        """Replace the streams by the inputs of block ``idx``, the first of a later stack, captured by running
        the whole model: the one being quantized as it is now (its earlier stacks quantized: sequential
        propagation) and, with ``with_expert``, each expert with its full state loaded."""
        s = self.stack_starts[idx]
        block = self.blocks[idx][1]
        with torch.no_grad():
            streams.model = [_capture_block_inputs(self.model, block, self.adapter, b, self.device, self.dtype, s,
                                                   self.store) for b in self.calib]
            if with_expert:
                work_block = self.adapter.find_blocks(self.work)[idx][1]
                theirs = []
                for t, (sd, batches) in enumerate(zip(self.experts, self.calib)):
                    _load_from(self.work, sd, "", f"expert {t}")
                    theirs.append(_capture_block_inputs(self.work, work_block, self.adapter, batches, self.device,
                                                        self.dtype, s, self.store))
                streams.expert = theirs

    def expert_block(self, idx: int, t: int) -> nn.Module:
        prefix, _ = self.blocks[idx]
        block = self.adapter.find_blocks(self.work)[idx][1]
        _load_from(block, self.experts[t], prefix, f"expert {t}")
        _link_mha_parents(block)
        return block

    @torch.no_grad()
    def expert_pass(self, idx: int, streams: _Streams, outputs: bool = False) -> list[list[dict]] | None:
        """Run every expert's block ``idx`` once: capture the inputs of all its sites and advance
        ``streams.expert`` to the next block. Expert inputs do not depend on what is quantized, so one pass
        serves every group of the block. Returns None (and advances nothing) when keeping the captures of
        the whole block would exceed ``EXPERT_CACHE_MB``; callers then recompute them per group.

        With ``outputs``, an input read only by layers whose target product is formed token by token
        (:func:`epmq.quant.target.direct_pays`) is kept as those layers' expert outputs instead, under
        ``("out", site name)`` (:meth:`TaskStats.expert_outputs`, the same bits ``TaskStats.add`` would form;
        for alpha = 1): ``d_out`` numbers a token instead of ``d_in`` (a quarter, for a ViT's ``c_proj``)."""
        out: list[list[dict]] = []
        nxt: list[list[_Call]] = []
        total_calls = sum(len(c) for c in streams.expert)
        for t, calls in enumerate(streams.expert):
            eb = self.expert_block(idx, t)
            sites = [s for g in self.adapter.find_linears(eb) for s in g]
            which = {s.input_key: s.tokens for s in sites}
            as_outputs = _output_sites(sites) if outputs else {}
            caps, moved = [], []
            for call in calls:
                with _Capture(sites) as cap:
                    moved.append(self._advance(eb, call))
                got = {k: call.real(x, f"expert {t} {k}", which[k]) for k, x in cap.inputs.items()}
                for k, named in as_outputs.items():
                    x = got.pop(k)
                    for n, V in named:
                        got[("out", n)] = TaskStats.expert_outputs(x, V, self.stats_dtype)
                caps.append(got)
                if len(caps) == 1 and t == 0:
                    per_call = sum(x.numel() * x.element_size() for x in got.values())
                    if per_call * total_calls > cache_budget_mb("EXPERT_CACHE_MB") * 2**20:
                        return None
            out.append(caps)
            nxt.append(moved)
        streams.expert = nxt
        return out

    def group_stats(self, idx, sites, streams, t, with_expert, expert_inputs=None,
                    reuse: _Reuse | None = None, direct: Mapping[str, torch.Tensor] | None = None,
                    alpha: float = 1.0) -> dict[str, TaskStats]:
        """Statistics of one task for one group of sites (shared inputs computed once). With ``expert_inputs``
        (from :meth:`expert_pass`) the expert's inputs are read from there instead of re-running its block;
        with ``reuse``, the model's block reads the outputs its finished parts gave in earlier passes.
        ``direct`` (site name -> task ``t``'s augmented expert weight): those sites' target products are
        accumulated token by token (``TaskStats(direct=...)``, blended with ``alpha``); an input whose sites
        are all direct collects no ``C``."""
        block = self.blocks[idx][1]
        direct = direct or {}
        keys, shared = {}, {}
        for s in sites:
            keys.setdefault(s.input_key, s)
            shared.setdefault(s.input_key, []).append(s)
        stats = {
            k: TaskStats(s.weight.shape[1], device=self.device, stats_dtype=self.stats_dtype, alpha=alpha,
                         with_expert=with_expert and any(x.name not in direct for x in shared[k]),
                         direct={x.name: direct[x.name] for x in shared[k] if x.name in direct})
            for k, s in keys.items()
        }
        esites = None
        if with_expert and expert_inputs is None:
            eblock = self.expert_block(idx, t)
            esites = [s for g in self.adapter.find_linears(eblock) for s in g if s.input_key in keys]
        with torch.no_grad():
            for i, call in enumerate(streams.model[t]):
                with _Capture(list(keys.values()), stop=True, reuse=reuse) as cap, _calling(reuse, (t, i)):
                    try:
                        _run_block(block, _use(call, self.store), self.dtype)
                    except _StopForward:
                        pass
                xe = {}
                if with_expert and expert_inputs is not None:
                    xe = expert_inputs[t][i]
                elif with_expert:
                    ecall = streams.expert[t][i]
                    with _Capture(esites, stop=True) as ecap:
                        try:
                            _run_block(eblock, _use(ecall, self.store), self.dtype)
                        except _StopForward:
                            pass
                    xe = {k: ecall.real(x, f"expert {t} {k}", keys[k].tokens) for k, x in ecap.inputs.items()}
                for k in keys:
                    name = f"{self.blocks[idx][0]}{keys[k].name} task {t}"
                    x = call.real(cap.inputs[k], name, keys[k].tokens)
                    ys = {s.name: xe[("out", s.name)] for s in shared[k] if ("out", s.name) in xe}
                    stats[k].add(x, xe.get(k) if with_expert else None, name=name, expert_outputs=ys)
        return stats

    def _advance(self, block: nn.Module, call: _Call) -> _Call:
        """The kept call of the next block: ``block`` run on the kept ``call`` (see :func:`_keep`, :func:`_use`)."""
        return _keep(_next_call(self.adapter, block, _use(call, self.store), self.dtype), self.store)

    def propagate(self, idx, streams, with_expert, reuse: _Reuse | None = None) -> None:
        """Advance the model's streams (and, with ``with_expert``, the experts') past block ``idx`` (``reuse``: see
        :meth:`group_stats`)."""
        block = self.blocks[idx][1]
        where = f"hidden state after {self.blocks[idx][0]}"
        if self.store is not None:
            where += f" (stored as act_dtype={self.act_dtype})"
        with torch.no_grad():
            for t, calls in enumerate(streams.model):
                nxt = []
                for i, c in enumerate(calls):
                    with _calling(reuse, (t, i)):
                        nxt.append(self._advance(block, c))
                streams.model[t] = nxt
                check_finite(streams.model[t][0].hidden, where)
            if with_expert:
                for t, calls in enumerate(streams.expert):
                    eb = self.expert_block(idx, t)
                    streams.expert[t] = [self._advance(eb, c) for c in calls]

    def bar(self):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.blocks)), desc=self.desc, unit="block", disable=not self.progress)


def _calling(reuse: _Reuse | None, key):
    return reuse.calling(key) if reuse is not None else nullcontext()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _expert_weight(engine: _Engine, t: int, prefix: str, site: Site):
    sd = engine.experts[t]
    key = prefix + site.name
    try:
        W = sd[key]
    except KeyError:
        raise EPMQError(f"expert {t}: missing key {key!r}") from None
    if tuple(W.shape) != tuple(site.weight.shape):
        raise EPMQError(f"expert {t}: {key!r} has shape {tuple(W.shape)}, merged has {tuple(site.weight.shape)}")
    b = None
    if site.bias_name is not None:
        b = sd[prefix + site.bias_name].to(engine.device)
    return W.to(engine.device), b


def _new_fold(engine, cfg, site) -> FoldedStats:
    W = site.weight
    return FoldedStats(W.shape[0], W.shape[1], alpha=cfg.alpha, task_weighting=cfg.task_weighting, device=engine.device,
                       pooled_only=not cfg.spec.needs_experts)


def _fold_task(engine, idx, site, folded: FoldedStats, t: int, stats: TaskStats, use_experts: bool) -> None:
    prefix = engine.blocks[idx][0]
    direct = site.name in stats.N  # the target product is already there (see _direct_weights)
    Wt, bt = _expert_weight(engine, t, prefix, site) if use_experts and not direct else (None, None)
    folded.add_task(stats, Wt, bt, name=f"{prefix}{site.name} task {t}", key=site.name)


def _output_sites(sites: list[Site]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Input key -> ``(name, [W b])`` of its sites, for the inputs read only by layers whose E-PMQ target
    product is formed token by token (``direct_pays``)."""
    by_key: dict[str, list[Site]] = {}
    for s in sites:
        by_key.setdefault(s.input_key, []).append(s)
    return {k: [(s.name, augment_weight(s.weight.detach(), None if s.bias is None else s.bias.detach(),
                                        torch.float32)) for s in ss]
            for k, ss in by_key.items()
            if all(direct_pays(*s.weight.shape) for s in ss)}


def _direct_weights(engine, idx, group, t: int) -> dict[str, torch.Tensor]:
    """Task ``t``'s augmented expert weights ``[W_t b_t]`` (float32) of the sites of ``group`` whose E-PMQ
    target product is cheaper token by token (:func:`epmq.quant.target.direct_pays`)."""
    prefix = engine.blocks[idx][0]
    out = {}
    for site in group:
        d_out, d_in = site.weight.shape
        if direct_pays(d_out, d_in):
            W, b = _expert_weight(engine, t, prefix, site)
            check_finite(W, f"{prefix}{site.name} task {t} (expert weight)")
            out[site.name] = augment_weight(W, b, torch.float32)
    return out


def _fold(engine, cfg, idx, site, per_task: list[dict[str, TaskStats]], use_experts: bool) -> FoldedStats:
    folded = _new_fold(engine, cfg, site)
    for t, stats in enumerate(per_task):
        _fold_task(engine, idx, site, folded, t, stats[site.input_key], use_experts)
    return folded


def _write(site: Site, Q: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        w = site.weight
        w.data.copy_(Q.to(w.device, w.dtype))
        if bias is not None:
            site.bias.data.copy_(bias.to(site.bias.device, site.bias.dtype))


def _share_weight(result, site: Site):
    """``result`` whose fake-quant ``weight`` is the layer's own (just written, same values): no second copy
    of every quantized weight stays alive in the report (1.2 GB at ViT-L/14). Kept as it is when the layer
    holds another dtype or device than the result."""
    w = site.weight
    r = result.weight
    if w.dtype == r.dtype and w.device == r.device and w.shape == r.shape and torch.equal(w, r):
        result.weight = w.detach()
    return result


def quantize_model(
    model: nn.Module,
    calib: Sequence[Sequence] | None,
    cfg: QuantConfig,
    *,
    experts: Sequence[nn.Module | Mapping[str, torch.Tensor]] | None = None,
    adapter: Adapter | str | None = None,
    stats: Mapping[str, list[TaskStats]] | None = None,
    device=None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize every site of ``model`` in place (fake-quant weights) with ``cfg.method``.

    Args:
        model: the merged model (an architecture an adapter recognises).
        calib: per task, a list of calibration batches (``adapter.run(model, batch)`` accepts each);
            unused by RTN and in ``fp`` propagation with precomputed ``stats``.
        cfg: the method and its knobs.
        experts: per task, the expert (module or state-dict mapping with the model's keys); needed by
            methods that use expert targets or E-PMQ's Hessian.
        stats: precomputed ``fp``-mode statistics from :func:`collect_stats` (site full name -> per task).
        device: where to compute (default: CUDA if available, else CPU).

    Returns:
        a :class:`QuantizeReport` with the :class:`QuantResult` of every rounded weight (full state-dict names).
        A result's ``weight`` is the model's own weight tensor (the values just written), not a copy, when the
        layer is float32 on the compute device: the report adds only codes, scales and zeros to memory.
    """
    spec = cfg.spec
    report = QuantizeReport()
    t_start = time.perf_counter()
    use_experts = spec.needs_experts
    engine = _Engine(model, calib or [], experts if use_experts else None, adapter, device, progress, cfg.method,
                     cfg.forward_dtype, cfg.act_dtype, cfg.stats_dtype)
    if use_experts and engine.experts is None:
        raise EPMQError(f"method {cfg.method!r} needs the experts (one per calibration task)")
    needs_data = spec.needs_calibration
    sequential = needs_data and stats is None
    if needs_data and stats is None and cfg.propagation == "fp":
        stats = collect_stats(model, calib, experts if use_experts else None, adapter=engine.adapter, device=device,
                              progress=progress, forward_dtype=cfg.forward_dtype, act_dtype=cfg.act_dtype,
                              stats_dtype=cfg.stats_dtype)
        sequential = False
    if stats is not None and use_experts:
        n_tasks = {len(v) for v in stats.values()}
        if n_tasks != {len(engine.experts)}:
            raise EPMQError(f"{len(engine.experts)} experts but statistics for {sorted(n_tasks)} tasks")
    if sequential and not calib:
        raise EPMQError(f"method {cfg.method!r} needs calibration batches")
    streams = engine.streams() if sequential else None
    for idx in engine.bar():
        prefix, block = engine.blocks[idx]
        if sequential and engine.starts_stack(idx):  # T5's decoder: its inputs come from the whole model
            engine.enter_stack(idx, streams, with_expert=use_experts)
        # the experts' inputs of this block, captured once for all groups (None: recompute per group)
        expert_inputs = (engine.expert_pass(idx, streams, outputs=cfg.alpha == 1.0)
                         if (sequential and use_experts) else None)
        groups = list(engine.adapter.find_linears(block))
        reuse = (_Reuse(block, [s for g in groups for s in g])
                 if sequential and cache_budget_mb("REUSE_CACHE_MB") > 0 else None)
        try:
            _quantize_block(engine, cfg, report, idx, groups, streams, sequential, needs_data, use_experts,
                            expert_inputs, stats, reuse)
        finally:
            if reuse is not None:
                reuse.close()
    report.seconds = time.perf_counter() - t_start
    return report


def _quantize_block(engine, cfg, report, idx, groups, streams, sequential, needs_data, use_experts, expert_inputs,
                    stats, reuse) -> None:
    """Collect, solve, round and write every group of block ``idx`` in order, then propagate past it."""
    prefix = engine.blocks[idx][0]
    for group in groups:
        folds = {}
        if sequential:
            # each task's statistics are folded as soon as they are collected and then dropped: memory
            # holds one task's (d_in + 1)^2 Grams, not T of them (T = 20 at ViT-L/14: 2.7 GB at d_in 4096)
            folds = {site.name: _new_fold(engine, cfg, site) for site in group}
            for t in range(len(engine.calib)):
                direct = _direct_weights(engine, idx, group, t) if use_experts else None
                task_stats = engine.group_stats(idx, group, streams, t, with_expert=use_experts,
                                                expert_inputs=expert_inputs, reuse=reuse, direct=direct,
                                                alpha=cfg.alpha)
                del direct
                for site in group:
                    _fold_task(engine, idx, site, folds[site.name], t, task_stats[site.input_key], use_experts)
                del task_stats
        plans = []
        for site in group:
            full = prefix + site.name
            folded = None
            if needs_data:
                if sequential:
                    folded = folds[site.name]
                else:
                    if full not in stats:
                        raise EPMQError(f"statistics have no entry for {full!r}")
                    folded = _fold(engine, cfg, idx, site, [{site.input_key: s} for s in stats[full]], use_experts)
            plans.append(cfg.spec.plan(cfg, site, full, folded))
        for plan, Q, bias, result, log in cfg.spec.round_group(cfg, plans):
            site, full = plan.site, plan.full
            _write(site, Q, bias)
            if reuse is not None:
                reuse.wrote(site)
            if result is not None:
                report.results[full] = _share_weight(result, site)
            if bias is not None:
                report.biases[prefix + site.bias_name] = bias
            report.layers.append(log)
    if sequential and not engine.starts_stack(idx + 1):  # a next stack re-captures its own inputs
        engine.propagate(idx, streams, with_expert=use_experts and expert_inputs is None, reuse=reuse)


def collect_stats(
    model: nn.Module,
    calib: Sequence[Sequence],
    experts: Sequence | None = None,
    *,
    adapter: Adapter | str | None = None,
    device=None,
    progress: bool = True,
    forward_dtype: str = "fp32",
    act_dtype: str = "fp32",
    stats_dtype: str = "fp32",
) -> dict[str, list[TaskStats]]:
    """``fp``-mode statistics of every site (full state-dict name -> one :class:`TaskStats` per task), from
    the full-precision ``model`` and, if given, the experts' own inputs. Independent of the quantizer
    (``forward_dtype``/``act_dtype``/``stats_dtype``: see :class:`QuantConfig`)."""
    engine = _Engine(model, calib, experts, adapter, device, progress, "collect", forward_dtype, act_dtype,
                     stats_dtype)
    with_expert = experts is not None
    streams = engine.streams()
    out: dict[str, list[TaskStats]] = {}
    for idx in engine.bar():
        prefix, block = engine.blocks[idx]
        if engine.starts_stack(idx):
            engine.enter_stack(idx, streams, with_expert)
        sites = [s for g in engine.adapter.find_linears(block) for s in g]
        expert_inputs = engine.expert_pass(idx, streams) if with_expert else None
        per_task = [engine.group_stats(idx, sites, streams, t, with_expert, expert_inputs) for t in range(len(calib))]
        for s in sites:
            out[prefix + s.name] = [pt[s.input_key] for pt in per_task]
        if not engine.starts_stack(idx + 1):
            engine.propagate(idx, streams, with_expert and expert_inputs is None)
    return out


def save_stats(stats: Mapping[str, list[TaskStats]], path, *, metadata: dict | None = None) -> None:
    """Write ``fp``-mode statistics as safetensors (atomically); shared inputs are stored once."""
    import json

    from epmq.io import save_safetensors_atomic

    tensors, index, seen = {}, {}, {}
    for name, per_task in stats.items():
        refs = []
        for t, s in enumerate(per_task):
            key = seen.get(id(s))
            if key is None:
                key = f"{name}/task{t}"
                seen[id(s)] = key
                tensors[f"{key}/G"] = s.G.contiguous().cpu()
                if s.C is not None:
                    tensors[f"{key}/C"] = s.C.contiguous().cpu()
            refs.append([key, s.n])
        index[name] = refs
    meta = {"index": json.dumps(index), "epmq_stats_version": "1"}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_safetensors_atomic(path, tensors, meta)


def load_stats(path) -> dict[str, list[TaskStats]]:
    import json

    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear message
        raise EPMQError(f"{path}: not a readable statistics file ({e})") from None
    with f:
        meta = f.metadata() or {}
        if meta.get("epmq_stats_version") != "1":
            raise EPMQError(f"{path}: not an epmq statistics file (missing epmq_stats_version)")
        index = json.loads(meta["index"])
        cache: dict[str, TaskStats] = {}
        out = {}
        keys = set(f.keys())
        for name, refs in index.items():
            per_task = []
            for key, n in refs:
                if key not in cache:
                    C = f.get_tensor(f"{key}/C") if f"{key}/C" in keys else None
                    cache[key] = TaskStats.from_tensors(f.get_tensor(f"{key}/G"), C, n)
                per_task.append(cache[key])
            out[name] = per_task
    return out
