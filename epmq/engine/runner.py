"""The block runner (:class:`Engine`): one model walked block by block, with every task's calibration calls
into the current block (:class:`Streams`) for the model being quantized and for each expert.

It captures the first block's inputs (:meth:`Engine.streams`), re-captures them at the first block of a later
stack by running the whole model (:meth:`Engine.enter_stack`, T5's decoder), runs each expert's block once to
capture all its sites' inputs (:meth:`Engine.expert_pass`), collects one task's statistics of one group of
sites (:meth:`Engine.group_stats`, as :class:`Collect` says) and advances the streams past a block
(:meth:`Engine.propagate`). What to do with the statistics is :mod:`epmq.engine.quantize`'s business.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from epmq.engine.budget import cache_budget_mb
from epmq.engine.capture import (
    Call, Capture, StopForward, capture_block_inputs, keep_call, link_mha_parents, next_call, run_block, use_call,
)
from epmq.engine.config import named_dtype
from epmq.engine.experts import load_from, state_dict_of
from epmq.engine.fold import output_sites
from epmq.engine.reuse import Reuse
from epmq.errors import EPMQError, check_finite
from epmq.models.adapters import Adapter, get_adapter
from epmq.quant.target import TaskStats

__all__ = ["Collect", "Engine", "EngineSetup", "Streams", "default_device"]


@dataclass(frozen=True)
class EngineSetup:
    """How an :class:`Engine` runs: the adapter (an :class:`Adapter`, a name, or None to detect it), where to
    compute (None: :func:`default_device`), the progress bar (shown?, its label) and the precision knobs of
    :class:`epmq.engine.config.QuantConfig`."""

    adapter: Adapter | str | None = None
    device: object = None
    progress: bool = True
    desc: str = "quantize"
    forward_dtype: str = "fp32"
    act_dtype: str = "fp32"
    stats_dtype: str = "fp32"


@dataclass(frozen=True)
class Collect:
    """How :meth:`Engine.group_stats` collects a group's statistics: with the expert's inputs
    (``with_expert``), read from ``expert_inputs`` (:meth:`Engine.expert_pass`; None: re-run the expert block),
    ``reuse`` (:class:`Reuse`: the model's block reads the outputs its finished parts gave in earlier passes),
    ``direct`` (site name -> the task's augmented expert weight: those sites' target products are accumulated
    token by token, blended with ``alpha``)."""

    with_expert: bool
    expert_inputs: list[list[dict]] | None = None
    reuse: Reuse | None = None
    direct: Mapping[str, torch.Tensor] | None = None
    alpha: float = 1.0


@dataclass
class Streams:
    """Per task: the calls into the current block for the model being quantized and for the expert."""

    model: list[list[Call]]
    expert: list[list[Call]] | None


class Engine:
    """``model``'s blocks in forward order (every stack's), ``calib`` (per task, its batches) and ``experts``
    (per task, a module or state-dict mapping; None: no expert inputs), run as ``setup`` says."""

    def __init__(self, model, calib, experts, setup: EngineSetup):
        self.dtype = named_dtype("forward_dtype", setup.forward_dtype)
        named_dtype("stats_dtype", setup.stats_dtype)
        self.stats_dtype = setup.stats_dtype
        #: storage dtype of the hidden states kept between blocks (None: as computed)
        self.store = named_dtype("act_dtype", setup.act_dtype)
        self.act_dtype = setup.act_dtype
        self.model = model
        adapter = setup.adapter
        self.adapter = adapter if isinstance(adapter, Adapter) else get_adapter(model, adapter)
        self.device = torch.device(setup.device) if setup.device else default_device()
        self.calib = calib
        self.experts = None if experts is None else [state_dict_of(e) for e in experts]
        if self.experts is not None and calib and len(self.experts) != len(calib):
            raise EPMQError(f"{len(self.experts)} experts but {len(calib)} calibration tasks: need one per task")
        self.progress, self.desc = setup.progress, setup.desc
        stacks = self.adapter.find_stacks(model)
        self.blocks = [b for stack in stacks for b in stack]
        #: block index -> stack number, for the first block of every stack (one stack: {0: 0})
        self.stack_starts: dict[int, int] = {}
        for s, stack in enumerate(stacks):
            self.stack_starts[sum(len(x) for x in stacks[:s])] = s
        for _, b in self.blocks:
            link_mha_parents(b)

    def streams(self) -> Streams:
        """Capture the inputs of the first block for every task, in the model and in each expert."""
        model = self.model.eval().to(self.device)
        first = self.blocks[0][1]
        with torch.no_grad():
            mine = [capture_block_inputs(model, first, self.adapter, b, self.device, self.dtype, store=self.store)
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
                    load_from(work, sd, "", f"expert {t}", skip=blocks)
                    theirs.append(capture_block_inputs(work, work_first, self.adapter, batches, self.device,
                                                       self.dtype, store=self.store))
                self.work = work
        return Streams(mine, theirs)

    def starts_stack(self, idx: int) -> bool:
        """Whether block ``idx`` opens a stack after the first (T5: the decoder's first block)."""
        return idx > 0 and idx in self.stack_starts

    def enter_stack(self, idx: int, streams: Streams, with_expert: bool) -> None:
        """Replace the streams by the inputs of block ``idx``, the first of a later stack, captured by running
        the whole model: the one being quantized as it is now (its earlier stacks quantized: sequential
        propagation) and, with ``with_expert``, each expert with its full state loaded."""
        s = self.stack_starts[idx]
        block = self.blocks[idx][1]
        with torch.no_grad():
            streams.model = [capture_block_inputs(self.model, block, self.adapter, b, self.device, self.dtype, s,
                                                  self.store) for b in self.calib]
            if with_expert:
                work_block = self.adapter.find_blocks(self.work)[idx][1]
                theirs = []
                for t, (sd, batches) in enumerate(zip(self.experts, self.calib)):
                    load_from(self.work, sd, "", f"expert {t}")
                    theirs.append(capture_block_inputs(self.work, work_block, self.adapter, batches, self.device,
                                                       self.dtype, s, self.store))
                streams.expert = theirs

    def expert_block(self, idx: int, t: int) -> nn.Module:
        """Expert ``t``'s block ``idx``: the working copy's block with that expert's weights loaded."""
        prefix, _ = self.blocks[idx]
        block = self.adapter.find_blocks(self.work)[idx][1]
        load_from(block, self.experts[t], prefix, f"expert {t}")
        link_mha_parents(block)
        return block

    @torch.no_grad()
    def expert_pass(self, idx: int, streams: Streams, outputs: bool = False) -> list[list[dict]] | None:
        """Run every expert's block ``idx`` once: capture the inputs of all its sites and advance
        ``streams.expert`` to the next block. Expert inputs do not depend on what is quantized, so one pass
        serves every group of the block. Returns None (and advances nothing) when keeping the captures of
        the whole block would exceed ``EXPERT_CACHE_MB``; callers then recompute them per group.

        With ``outputs``, an input read only by layers whose target product is formed token by token
        (:func:`epmq.quant.target.direct_pays`) is kept as those layers' expert outputs instead, under
        ``("out", site name)`` (:meth:`TaskStats.expert_outputs`, the same bits ``TaskStats.add`` would form;
        for alpha = 1): ``d_out`` numbers a token instead of ``d_in`` (a quarter, for a ViT's ``c_proj``)."""
        out: list[list[dict]] = []
        nxt: list[list[Call]] = []
        total_calls = sum(len(c) for c in streams.expert)
        for t, calls in enumerate(streams.expert):
            eb = self.expert_block(idx, t)
            sites = [s for g in self.adapter.find_linears(eb) for s in g]
            which = {s.input_key: s.tokens for s in sites}
            as_outputs = output_sites(sites) if outputs else {}
            caps, moved = [], []
            for call in calls:
                with Capture(sites) as cap:
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

    def group_stats(self, idx, sites, streams, t, how: Collect) -> dict[str, TaskStats]:
        """Statistics of one task for one group of sites (shared inputs computed once), collected as ``how``
        says (:class:`Collect`): with its ``expert_inputs`` the expert's inputs are read from there instead of
        re-running its block; sites in its ``direct`` accumulate their target products token by token
        (``TaskStats(direct=...)``); an input whose sites are all direct collects no ``C``."""
        with_expert, expert_inputs, reuse, alpha = how.with_expert, how.expert_inputs, how.reuse, how.alpha
        block = self.blocks[idx][1]
        direct = how.direct or {}
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
                with Capture(list(keys.values()), stop=True, reuse=reuse) as cap, _calling(reuse, (t, i)):
                    try:
                        run_block(block, use_call(call, self.store), self.dtype)
                    except StopForward:
                        pass
                xe = {}
                if with_expert and expert_inputs is not None:
                    xe = expert_inputs[t][i]
                elif with_expert:
                    ecall = streams.expert[t][i]
                    with Capture(esites, stop=True) as ecap:
                        try:
                            run_block(eblock, use_call(ecall, self.store), self.dtype)
                        except StopForward:
                            pass
                    xe = {k: ecall.real(x, f"expert {t} {k}", keys[k].tokens) for k, x in ecap.inputs.items()}
                for k in keys:
                    name = f"{self.blocks[idx][0]}{keys[k].name} task {t}"
                    x = call.real(cap.inputs[k], name, keys[k].tokens)
                    ys = {s.name: xe[("out", s.name)] for s in shared[k] if ("out", s.name) in xe}
                    stats[k].add(x, xe.get(k) if with_expert else None, name=name, expert_outputs=ys)
        return stats

    def _advance(self, block: nn.Module, call: Call) -> Call:
        """The kept call of the next block: ``block`` run on the kept ``call`` (see :func:`keep_call`,
        :func:`use_call`)."""
        return keep_call(next_call(self.adapter, block, use_call(call, self.store), self.dtype), self.store)

    def propagate(self, idx, streams, with_expert, reuse: Reuse | None = None) -> None:
        """Advance the model's streams (and, with ``with_expert``, the experts') past block ``idx`` (``reuse``: see
        :class:`Collect`)."""
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
        """The block indices, behind a progress bar (unless ``progress`` is off)."""
        from tqdm.auto import tqdm

        return tqdm(range(len(self.blocks)), desc=self.desc, unit="block", disable=not self.progress)


def _calling(reuse: Reuse | None, key):
    """``reuse``'s context of the block call with input ``key`` (nothing without reuse)."""
    return reuse.calling(key) if reuse is not None else nullcontext()


def default_device() -> torch.device:
    """Where the engine computes when no device is given: CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
