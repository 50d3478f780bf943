"""Digest of a results folder: one hash per record and weight file, timing and provenance left out.

Two runs of the same grid on the same machine produce the same digest; a refactoring that claims to change
no number proves it by comparing digests before and after (``epmq digest results/ --against before.txt``).

* a JSON record hashes its canonical form without the fields that measure the run rather than the result
  (:data:`VOLATILE` and every ``*_seconds``: times, peak memory, versions and the git SHA);
* a ``.safetensors`` file hashes its header parsed to canonical JSON (safetensors writes the ``__metadata__``
  map in a different key order in each process) followed by its tensor bytes; every other file is not part
  of the digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from epmq.errors import EPMQError
from epmq.io import read_safetensors_header

#: keys dropped at any depth of a JSON record before hashing
VOLATILE = frozenset({"seconds", "eval_seconds", "quantize_seconds", "peak_rss_mb", "gpu_mb", "cost", "provenance"})


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def file_digest(path: Path) -> str:
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except ValueError as err:
            raise EPMQError(f"{path}: corrupt JSON ({err})") from None
        data = json.dumps(_strip(obj), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(data).hexdigest()
    header = read_safetensors_header(path)
    h = hashlib.sha256(json.dumps(header.raw, sort_keys=True, separators=(",", ":")).encode())
    with open(path, "rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(folder) -> dict[str, str]:
    """``{path relative to folder: sha256}`` of every ``.json`` and ``.safetensors`` file below ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EPMQError(f"{folder}: not a folder")
    return {str(p.relative_to(folder)): file_digest(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".json", ".safetensors")}


def dumps(d: dict[str, str]) -> str:
    return "".join(f"{h}  {p}\n" for p, h in sorted(d.items()))


def loads(text: str) -> dict[str, str]:
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            h, sep, p = line.partition("  ")
            if not sep or len(h) != 64:
                raise EPMQError(f"digest line {n}: expected '<sha256>  <path>', got {line!r}")
            out[p] = h
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per difference (``changed``, ``missing``, ``new``), in path order; [] when equal."""
    lines = []
    for p in sorted(set(before) | set(after)):
        if p not in after:
            lines.append(f"missing  {p}")
        elif p not in before:
            lines.append(f"new      {p}")
        elif before[p] != after[p]:
            lines.append(f"changed  {p}")
    return lines
