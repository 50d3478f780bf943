"""Block calls and input capture: how the engine records what a block and its layers see.

* :class:`Call`: one captured call of a block (positional args with the hidden state first, kwargs, token
  masks); :func:`capture_block_inputs` records the calls of a model's first block (of a stack) by running the
  model with a pre-hook that stops the forward there.
* :func:`run_block` / :func:`next_call`: run a block on a call; :func:`keep_call` / :func:`use_call`: the
  hidden state stored in ``act_dtype`` between blocks, and back in float32 when a block runs on it.
* :class:`Capture`: hooks that record the inputs of a group's sites during one block call, including the
  fused ``in_proj`` input and the attention context of an ``nn.MultiheadAttention`` (its ``out_proj`` is
  never called by the fused kernel: the context is recomputed with an identity output projection, after
  :func:`link_mha_parents` has told each ``out_proj`` its parent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from epmq.errors import EPMQError
from epmq.models.adapters import Adapter, Site
from epmq.precision import autocast

if TYPE_CHECKING:
    from epmq.engine.reuse import Reuse

__all__ = [
    "Call", "Capture", "StopForward", "capture_block_inputs", "keep_call", "link_mha_parents", "next_call", "run_block",
    "use_call",
]


class StopForward(Exception):
    """Raised by a capture hook to end a block (or model) call once what it wanted is recorded."""


@dataclass
class Call:
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

    def with_hidden(self, h: torch.Tensor) -> "Call":
        return Call((h, *self.args[1:]), self.kwargs, self.tokens, self.masks)

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


def capture_block_inputs(
    model: nn.Module, block: nn.Module, adapter: Adapter, batches, device, dtype: torch.dtype | None = None,
    stack: int = 0, store: torch.dtype | None = None,
) -> list[Call]:
    """Run ``model`` on every batch up to ``block`` (the first block of stack ``stack``) and keep its calls
    (their hidden states in ``store``, see :func:`keep_call`). ``dtype``: autocast dtype of the forward
    (None: float32). Eight parameters: the last three have defaults, so a plain capture (the benchmark's
    reference loop) passes the first five."""
    calls: list[Call] = []
    tokens = [(None, None)]

    def hook(_mod, args, kwargs):
        if not args:  # hidden state passed by keyword
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            kwargs = dict(kwargs)
            args = (kwargs.pop(key),)
        calls.append(keep_call(Call(tuple(args), dict(kwargs), *tokens[0]), store))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = _to(batch, device)
            tokens[0] = adapter.stack_masks(batch, stack)
            try:
                with autocast(device, dtype):
                    adapter.run(model, batch)
            except StopForward:
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


def keep_call(call: Call, store: torch.dtype | None) -> Call:
    """``call`` as kept between blocks: its hidden state cast to ``store`` (None: unchanged, no cast)."""
    if store is None or not call.hidden.is_floating_point() or call.hidden.dtype == store:
        return call
    return call.with_hidden(call.hidden.to(store))


def use_call(call: Call, store: torch.dtype | None) -> Call:
    """A kept ``call`` ready to run: a hidden state stored in ``store`` back in float32 (None: unchanged)."""
    if store is None or call.hidden.dtype != store:
        return call
    return call.with_hidden(call.hidden.float())


def run_block(block: nn.Module, call: Call, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``block`` run on ``call`` (under autocast to ``dtype``; None: float32): its output hidden state."""
    with autocast(call.hidden.device, dtype):
        out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def next_call(adapter: Adapter, block: nn.Module, call: Call, dtype: torch.dtype | None = None) -> Call:
    """Run ``block`` on ``call``; the call of the next block (``adapter.advance`` where more than the hidden
    state changes from block to block)."""
    if adapter.advance is None:
        return call.with_hidden(run_block(block, call, dtype))
    with autocast(call.hidden.device, dtype):
        out = block(*call.args, **call.kwargs)
    args, kwargs = adapter.advance(call.args, call.kwargs, out)
    return Call(tuple(args), dict(kwargs), call.tokens, call.masks)


class Capture:
    """Hooks that record the inputs of a group's sites during one block call (by input key)."""

    def __init__(self, sites: Sequence[Site], *, stop: bool = False, reuse: "Reuse | None" = None):
        self.sites = sites
        self.inputs: dict[str, torch.Tensor] = {}
        self._busy = False
        self._reuse = reuse
        # stop: end the block call (raise StopForward) as soon as every wanted input is captured, so a group
        # early in the block does not pay for the rest of it
        self._stop_after = {s.input_key for s in sites} if stop else None

    def _store(self, key: str, x: torch.Tensor) -> None:
        self.inputs[key] = x.detach()
        if self._stop_after is not None and self._stop_after.issubset(self.inputs):
            raise StopForward

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


def link_mha_parents(block: nn.Module) -> None:
    """Tell the ``out_proj`` of every ``nn.MultiheadAttention`` in ``block`` its parent, so a :class:`Capture`
    of an ``mha_out`` site can recompute the attention context (call once per block before capturing)."""
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention):
            object.__setattr__(m.out_proj, "_epmq_parent_mha", m)
