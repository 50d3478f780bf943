"""Merge whole state dicts, streaming one tensor name at a time, and merge .safetensors files.

:func:`merge_stream` applies a registered tensor function (:data:`epmq.merge.METHODS`) key by key and hands
the merged tensors over one at a time; :func:`merge_state_dicts` collects them into a dict and
:func:`merge_files` writes them to a .safetensors file as they come. ``base`` and the experts are any
``Mapping[str, Tensor]``, possibly lazy (:func:`lazy_state_dict`): the driver only calls ``keys()`` and
``[key]``, and reads an expert's tensor only when the method reaches it (:class:`_KeyExperts`). Per key it
holds the base tensor, the expert tensor being read and what the method keeps -- task arithmetic and
averaging a float32 sum, TIES one (T, n) float32 buffer of task vectors -- never T full models. Streamed to a
file, peak memory is about T + 3 tensors of the largest key (TIES), 4 (task arithmetic).

Per key:

* excluded keys -- those matching an ``exclude`` regular expression (``re.search``; default
  :data:`DEFAULT_EXCLUDE`: classification heads, ``position_ids`` and ``attn_mask`` buffers) and every
  non-floating-point tensor (e.g. ``num_batches_tracked``) -- are copied from the base, or from expert 0
  when there is no base (plain averaging). Their shapes are not compared: per-task heads may differ;
* merged keys must have the base's shape and dtype in every expert and be finite; the method computes in
  float32 and the result is cast back to the base's dtype.

Every expert must have exactly the base's keys. Each failed check raises :class:`~epmq.errors.EPMQError`
naming the key and the expert index.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epmq.errors import EPMQError, check_finite
from epmq.io import ST_DTYPES, read_safetensors_header
from epmq.merge.base import MergeData, MergeMethod, mix_seed
from epmq.merge.registry import get_method

if TYPE_CHECKING:
    import torch

    StateDict = Mapping[str, torch.Tensor]

#: Keys never merged by default: classification heads (``head.*``, ``lm_head.*``, ``classification_head.*``,
#: ``classifier.*``, ``heads.*`` -- but not ``multihead_attn.*``) and buffers that are not weights.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(\w+_)?(head|heads|classifier)(\.|$)",
    r"(^|\.)position_ids$",
    r"(^|\.)attn_mask$",
)


class SafetensorsStateDict(Mapping):
    """A read-only ``Mapping`` over a .safetensors file; each ``[key]`` reads that one tensor (on CPU).

    The tensor's bytes are read with ``pread`` into a fresh buffer, not memory-mapped: a mapped file's pages
    count towards the process's resident set for as long as the file stays open, so streaming T experts
    through a mapping would show T experts' worth of RSS although only one block of each is in use. The
    header is validated up front (offsets inside the file, byte counts matching shapes and dtypes); a bad
    file raises :class:`~epmq.errors.EPMQError` naming it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_safetensors_header(self.path)
        self._meta = header.metadata
        self._start = header.data_start
        self._entries = {key: (ST_DTYPES[dtype][0], shape, b, end)
                         for key, (dtype, shape, b, end) in header.tensors.items()}
        self._keys = tuple(sorted(self._entries))  # as safe_open lists them
        # one descriptor for the object's life: every read sees the file that was validated, even if a new
        # one is later moved over its path
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        if key not in self._entries:
            raise KeyError(key)
        torch_name, shape, b, end = self._entries[key]
        dtype = getattr(torch, torch_name)
        nbytes = end - b  # = numel * itemsize, checked when the header was read
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        got = _read_at(self._fd, buf, self._start + b)
        if got != nbytes:
            raise EPMQError(f"{self.path}: tensor {key!r}: file ended after {got} of {nbytes} bytes (truncated?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of tensor ``key``, from the header (nothing is read)."""
        import torch

        if key not in self._entries:
            raise KeyError(key)
        torch_name, shape, _, _ = self._entries[key]
        return getattr(torch, torch_name), shape

    def __len__(self) -> int:
        return len(self._keys)

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (empty when it has none)."""
        return dict(self._meta)


def _read_at(fd: int, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from ``fd`` at ``offset`` (looping: one read returns at most ~2 GiB); bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [view[got:]], offset + got)
        else:  # no preadv (Windows): seek + read, fine for the one reader of this descriptor
            os.lseek(fd, offset + got, os.SEEK_SET)
            chunk = os.read(fd, min(len(buf) - got, 2**30))
            k = len(chunk)
            view[got:got + k] = chunk
        if k == 0:
            break
        got += k
    return got


def lazy_state_dict(path: str | os.PathLike) -> SafetensorsStateDict:
    """Open a .safetensors file as a lazy, read-only state dict."""
    return SafetensorsStateDict(path)


def resolve_hparams(method: str | MergeMethod, hparams: Mapping[str, Any]) -> tuple[MergeMethod, dict[str, Any]]:
    """The method and its full hyperparameters: ``hparams`` over its defaults; unknown names raise."""
    spec = get_method(method)
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise EPMQError(f"{spec.name}: unknown hyperparameter {unknown[0]!r}, expected one of {sorted(spec.defaults)}")
    return spec, {**spec.defaults, **hparams}


def _compile(exclude: Sequence[str] | str) -> list[re.Pattern]:
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise EPMQError(f"exclude pattern {pattern!r}: invalid regular expression ({err})") from err
    return compiled


def _check_keys(reference: StateDict, ref_name: str, experts: Sequence[StateDict]) -> list[str]:
    keys = list(reference.keys())
    wanted = set(keys)
    for i, expert in enumerate(experts):
        have = set(expert.keys())
        if missing := sorted(wanted - have):
            raise EPMQError(f"{missing[0]}: key of {ref_name} missing from expert {i} ({len(missing)} missing)")
        if extra := sorted(have - wanted):
            raise EPMQError(f"{extra[0]}: key of expert {i} not in {ref_name} ({len(extra)} extra)")
    return keys


class _KeyExperts(Sequence):
    """The experts' tensors of one key, each read from its state dict when accessed, checked against the
    reference's dtype and shape and for finiteness, and not kept: a method that goes through it once holds
    one expert tensor at a time (and a lazy state dict reads each once)."""

    def __init__(self, experts: Sequence[StateDict], key: str, dtype, shape, ref_name: str):
        self._experts, self._key, self._dtype, self._shape, self._ref_name = experts, key, dtype, shape, ref_name

    def __len__(self) -> int:
        return len(self._experts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._experts)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        tensor = self._experts[i][self._key]
        if tuple(tensor.shape) != self._shape or tensor.dtype != self._dtype:
            raise EPMQError(
                f"{self._key}: expert {i} has {tuple(tensor.shape)} {tensor.dtype}, "
                f"{self._ref_name} has {self._shape} {self._dtype}"
            )
        return check_finite(tensor, f"{self._key} (expert {i})")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._experts)):
            tensor = self[i]
            yield tensor
            del tensor  # released before the next one is read


def _describe(state_dict: StateDict, key: str) -> tuple[Any, tuple[int, ...]]:
    """(dtype, shape) of one tensor: from a lazy state dict's ``describe(key)`` when it has one (nothing is
    read: :class:`SafetensorsStateDict` answers from the file's header), else from the tensor."""
    describe = getattr(state_dict, "describe", None)
    if callable(describe):
        dtype, shape = describe(key)
        return dtype, tuple(shape)
    tensor = state_dict[key]
    return tensor.dtype, tuple(tensor.shape)


class MergeStream:
    """One merge, checked and ready to run tensor by tensor (:func:`merge_stream`).

    Attributes:
        method: the :class:`MergeMethod`.
        hparams: its full hyperparameters (before a ``prepare`` pass adds internal ones).
        layout: every output key, in the reference's key order, with its ``(dtype, shape)`` -- the merged
            tensors have the reference's (base's, or expert 0's) dtypes and shapes -- e.g. for
            :class:`epmq.io.SafetensorsStream`.
        merge_keys: the keys the method merges; the others are copied from the reference.
    """

    def __init__(self, base, experts, method, exclude, hparams, data=None):
        self.method, self.hparams = resolve_hparams(method, hparams)
        if self.method.needs_calibration and data is None:
            raise EPMQError(f"merge method {self.method.name} reads calibration data: pass data=MergeData(...)")
        self.data = data
        self._experts = list(experts)
        if not self._experts:
            raise EPMQError("experts: empty list, expected at least one expert state dict")
        if base is None and self.method.needs_base:
            raise EPMQError(f"base: None, but {self.method.name} needs the pretrained model θ₀")
        self._base = base
        self._reference, self._ref_name = (base, "base") if base is not None else (self._experts[0], "expert 0")
        keys = _check_keys(self._reference, self._ref_name, self._experts)
        self.layout = {key: _describe(self._reference, key) for key in keys}
        patterns = _compile(exclude)
        self.merge_keys = [key for key in keys
                           if not any(p.search(key) for p in patterns) and self.layout[key][0].is_floating_point]
        if not self.merge_keys:
            raise EPMQError(f"exclude={exclude!r}: every key of {self._ref_name} is excluded, nothing to merge")
        self._prepared = None

    def load(self, key: str) -> tuple[torch.Tensor | None, _KeyExperts]:
        """The finite base tensor (None without a base) and the experts' tensors of one merged key, the latter
        read and checked on access (:class:`_KeyExperts`)."""
        dtype, shape = self.layout[key]
        experts = _KeyExperts(self._experts, key, dtype, shape, self._ref_name)
        if self._base is None:
            return None, experts
        return check_finite(self._base[key], f"{key} (base)"), experts

    def tensors(self, order: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, merged tensor)`` for every key of :attr:`layout`, in ``order`` (default: the layout's),
        one at a time; the method's ``prepare`` pass runs first (once per stream). Nothing is kept between
        keys: a consumer that writes each tensor away holds one key's tensors at a time."""
        from tqdm import tqdm

        keys = list(self.layout) if order is None else list(order)
        if sorted(keys) != sorted(self.layout):
            raise EPMQError("order: not a permutation of the merged model's keys")
        if self._prepared is None:
            prepare = self.method.prepare
            if prepare is None:
                self._prepared = self.hparams
            elif self.method.needs_calibration:
                self._prepared = prepare(self.load, self.merge_keys, self.hparams, self.data)
            else:
                self._prepared = prepare(self.load, self.merge_keys, self.hparams)
        hp = self._prepared
        to_merge = set(self.merge_keys)
        for key in tqdm(keys, desc=f"merge ({self.method.name})", unit="tensor", disable=None):
            if key not in to_merge:
                yield key, self._reference[key].clone()
                continue
            base_tensor, expert_tensors = self.load(key)
            tensor_hp = {**hp, "seed": mix_seed(hp["seed"], key)} if "seed" in hp else hp
            merged = self.method.fn(base_tensor, expert_tensors, **tensor_hp).to(self.layout[key][0])
            del base_tensor, expert_tensors
            yield key, merged
            del merged


def merge_stream(
    base: StateDict | None,
    experts: Sequence[StateDict],
    method: str | MergeMethod,
    *,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    data: MergeData | None = None,
    **hparams,
) -> MergeStream:
    """Check a merge of ``experts`` (fine-tuned from ``base``) with ``method`` and return it as a
    :class:`MergeStream`: its :attr:`~MergeStream.layout` is known before any tensor is read, and
    :meth:`~MergeStream.tensors` yields the merged tensors one key at a time. Arguments as for
    :func:`merge_state_dicts`, of which this is the streaming form (same tensors, bit for bit); ``data`` is
    what a data-aware method (``needs_calibration``) reads."""
    return MergeStream(base, experts, method, exclude, hparams, data)


def merge_state_dicts(
    base: StateDict | None,
    experts: Sequence[StateDict],
    method: str | MergeMethod,
    *,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    data: MergeData | None = None,
    **hparams,
) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (fine-tuned from ``base``) with ``method``; returns the merged state dict.

    ``hparams`` override the method's defaults (``METHODS[method].defaults``). ``base`` may be None only
    for methods with ``needs_base=False`` (``"average"``); excluded keys then come from expert 0. The whole
    result is in memory: :func:`merge_stream` / :func:`merge_files` hand it over tensor by tensor.
    """
    return dict(merge_stream(base, experts, method, exclude=exclude, data=data, **hparams).tensors())


def merge_files(
    base_path: str | os.PathLike | None,
    expert_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    method: str | MergeMethod,
    *,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    **hparams,
) -> Path:
    """Merge .safetensors checkpoints into ``out_path``, streamed: the inputs are read and the output written
    tensor by tensor (:class:`epmq.io.SafetensorsStream`: temp file, fsync, ``os.replace``), so memory holds
    one key's tensors, never a whole model.

    The output's metadata records the method, its full hyperparameters and the exclude patterns (JSON).
    """
    from epmq.io import SafetensorsStream

    base = lazy_state_dict(base_path) if base_path is not None else None
    stream = merge_stream(base, [lazy_state_dict(p) for p in expert_paths], method, exclude=exclude, **hparams)
    metadata = {
        "epmq.merge.method": stream.method.name,
        "epmq.merge.hparams": json.dumps(stream.hparams, sort_keys=True),
        "epmq.merge.exclude": json.dumps([exclude] if isinstance(exclude, str) else list(exclude)),
    }
    with SafetensorsStream(out_path, stream.layout, metadata) as writer:
        for key, tensor in stream.tensors(order=writer.order):
            writer.write(key, tensor)
    return Path(out_path)
