"""Atomic file writes: every artefact is written to a temp file in its folder, then ``os.replace``d, so an
interrupted run never leaves a partial file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (never a partial file)."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def save_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Save ``tensors`` (detached, contiguous, on CPU) as safetensors with string ``metadata``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp(path)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(tmp),
        metadata={k: str(v) for k, v in (metadata or {}).items()} or None,
    )
    os.replace(tmp, path)
    return path
