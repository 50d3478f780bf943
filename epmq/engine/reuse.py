"""The reuse cache (:class:`Reuse`): a block's finished sub-modules are not recomputed by its later
true-sequential passes over the same calibration call. Its memory is bounded by ``REUSE_CACHE_MB``
(:mod:`epmq.engine.budget`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from epmq.engine.budget import cache_budget_mb
from epmq.models.adapters import Site

__all__ = ["Reuse"]


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


class Reuse:
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
