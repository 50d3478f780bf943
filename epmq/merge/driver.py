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


class SafetensorsStateDict(Mapping):
    """A read-only ``Mapping`` over a .safetensors file; each ``[key]`` loads that one tensor (on CPU)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise EPMQError(f"{self.path}: no such safetensors file")
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise EPMQError(f"{self.path}: not a readable safetensors file ({err})") from err
        self._keys = tuple(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (empty when it has none)."""
        return self._file.metadata() or {}


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
