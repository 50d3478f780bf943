"""Merge whole state dicts, streaming one tensor name at a time, and merge .safetensors files.

:func:`merge_state_dicts` applies a registered tensor function (:data:`epmq.merge.METHODS`) key by key.
``base`` and the experts are any ``Mapping[str, Tensor]``, possibly lazy (:func:`lazy_state_dict`): the
driver only calls ``keys()`` and ``[key]``, and holds at most one key's T + 1 tensors (plus the merged
output) at a time, never T full models.

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
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epmq.errors import EPMQError, check_finite
from epmq.merge.base import MergeMethod, mix_seed
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


#: safetensors dtype names -> (torch dtype name, bytes per element); torch is resolved on first read
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
              "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1),
              "F8_E5M2": ("float8_e5m2", 1)}
_MAX_HEADER = 100 * 2**20


class SafetensorsStateDict(Mapping):
    """A read-only ``Mapping`` over a .safetensors file; each ``[key]`` reads that one tensor (on CPU).

    The tensor's bytes are read with ``pread`` into a fresh buffer, not memory-mapped: a mapped file's pages
    count towards the process's resident set for as long as the file stays open, so streaming T experts
    through a mapping would show T experts' worth of RSS although only one block of each is in use. The
    header is validated up front (offsets inside the file, byte counts matching shapes and dtypes); a bad
    file raises :class:`~epmq.errors.EPMQError` naming it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise EPMQError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise EPMQError(f"{self.path}: not a readable safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except ValueError as err:
                raise EPMQError(f"{self.path}: not a readable safetensors file (header: {err})") from err
        if not isinstance(header, dict):
            raise EPMQError(f"{self.path}: not a readable safetensors file (header is not an object)")
        self._meta = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = {}
        for key, e in header.items():
            try:
                dtype, shape, (b, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise EPMQError(f"{self.path}: tensor {key!r}: malformed header entry") from err
            if dtype not in _ST_DTYPES:
                raise EPMQError(f"{self.path}: tensor {key!r}: unsupported dtype {dtype!r}")
            if not (0 <= b <= end <= size - self._start) or any(d < 0 for d in shape):
                raise EPMQError(f"{self.path}: tensor {key!r}: data offsets outside the file (truncated?)")
            if end - b != math.prod(shape) * _ST_DTYPES[dtype][1]:
                raise EPMQError(f"{self.path}: tensor {key!r}: {end - b} bytes for shape {shape} {dtype}")
            self._entries[key] = (_ST_DTYPES[dtype][0], tuple(shape), b, end)
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


def merge_state_dicts(
    base: StateDict | None,
    experts: Sequence[StateDict],
    method: str | MergeMethod,
    *,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    **hparams,
) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (fine-tuned from ``base``) with ``method``; returns the merged state dict.

    ``hparams`` override the method's defaults (``METHODS[method].defaults``). ``base`` may be None only
    for methods with ``needs_base=False`` (``"average"``); excluded keys then come from expert 0.
    """
    from tqdm import tqdm

    spec, hp = resolve_hparams(method, hparams)
    experts = list(experts)
    if not experts:
        raise EPMQError("experts: empty list, expected at least one expert state dict")
    if base is None and spec.needs_base:
        raise EPMQError(f"base: None, but {spec.name} needs the pretrained model θ₀")
    reference, ref_name = (base, "base") if base is not None else (experts[0], "expert 0")
    keys = _check_keys(reference, ref_name, experts)
    patterns = _compile(exclude)
    merge_keys = [
        key for key in keys if not any(p.search(key) for p in patterns) and reference[key].is_floating_point()
    ]
    if not merge_keys:
        raise EPMQError(f"exclude={exclude!r}: every key of {ref_name} is excluded, nothing to merge")

    def load(key: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The validated base and expert tensors of one merged key."""
        tensors = [expert[key] for expert in experts]
        ref = reference[key] if base is not None else tensors[0]
        for i, tensor in enumerate(tensors):
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                raise EPMQError(
                    f"{key}: expert {i} has {tuple(tensor.shape)} {tensor.dtype}, "
                    f"{ref_name} has {tuple(ref.shape)} {ref.dtype}"
                )
            check_finite(tensor, f"{key} (expert {i})")
        if base is None:
            return None, tensors
        check_finite(ref, f"{key} (base)")
        return ref, tensors

    if spec.prepare is not None:
        hp = spec.prepare(load, merge_keys, hp)
    to_merge = set(merge_keys)
    merged = {}
    for key in tqdm(keys, desc=f"merge ({spec.name})", unit="tensor", disable=None):
        if key not in to_merge:
            merged[key] = reference[key].clone()
            continue
        base_tensor, expert_tensors = load(key)
        tensor_hp = {**hp, "seed": mix_seed(hp["seed"], key)} if "seed" in hp else hp
        merged[key] = spec.fn(base_tensor, expert_tensors, **tensor_hp).to(expert_tensors[0].dtype)
    return merged


def merge_files(
    base_path: str | os.PathLike | None,
    expert_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    method: str | MergeMethod,
    *,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    **hparams,
) -> Path:
    """Merge .safetensors checkpoints into ``out_path``, written atomically (temp file + ``os.replace``).

    The output's metadata records the method, its full hyperparameters and the exclude patterns (JSON).
    """
    from safetensors.torch import save_file

    spec, hp = resolve_hparams(method, hparams)
    base = lazy_state_dict(base_path) if base_path is not None else None
    merged = merge_state_dicts(base, [lazy_state_dict(p) for p in expert_paths], spec, exclude=exclude, **hparams)
    metadata = {
        "epmq.merge.method": spec.name,
        "epmq.merge.hparams": json.dumps(hp, sort_keys=True),
        "epmq.merge.exclude": json.dumps([exclude] if isinstance(exclude, str) else list(exclude)),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({key: tensor.contiguous() for key, tensor in merged.items()}, tmp, metadata=metadata)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
