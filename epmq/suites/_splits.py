"""The prepared *split cache* of an embedded suite: ``{cache_dir}/splits.safetensors``.

Every workflow job that evaluates, calibrates, merges or fine-tunes runs after the suite's ``base`` job, and
each is a short process: re-loading the data sets there (importing HF ``datasets``, reading arrow caches,
tokenizing) would cost more than a second per job. So ``build_base()`` writes every task's splits once, in
the exact form the suite uses internally (uint8 images / token ids, int64 labels, class counts), to one
safetensors file, and later processes read the tensors they need from it (memory-mapped, lazily).

The file's metadata (``epmq_splits``) is the JSON of everything that determines its content -- the format
version below, the suite, its seed, tasks, data options, the data loaders' source digest, and for a text
suite its tokenizer -- as :class:`SplitCache` is given it. A reader trusts the file only when that key
equals its own; otherwise (missing file, other settings) it falls back silently to the data sets, and an
unreadable file (bad header, truncated, a tensor missing) falls back with a one-line warning on stderr.
Only ``build_base()`` writes (atomically); other processes never do, as jobs run concurrently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from epmq.io import save_safetensors_atomic

FILENAME = "splits.safetensors"
SPLITS = ("train", "validation", "test")
#: version of the file's layout; part of every key (bump it when what a suite stores changes)
FORMAT_VERSION = 1
_META = "epmq_splits"


class SplitCache:
    """``path`` (a suite's ``splits.safetensors``) for the data described by ``key`` (a JSON-able dict)."""

    def __init__(self, path: str | Path, key: dict):
        self.path = Path(path)
        self.key = json.loads(json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True))
        self._unreadable = False  # warned once; not tried again by this object

    def _warn(self, err) -> None:
        if not self._unreadable:
            msg = " ".join(str(err).split()) or type(err).__name__
            print(f"warning: {self.path}: unreadable split cache ({msg}); loading the data sets instead",
                  file=sys.stderr)
        self._unreadable = True

    def _matches(self, handle) -> bool:
        try:
            return json.loads((handle.metadata() or {}).get(_META, "null")) == self.key
        except ValueError:
            return False

    def read(self, names) -> dict | None:
        """The tensors ``names`` (CPU, owned) when the file exists, is readable and was written for this key;
        else None (the caller loads its data sets instead)."""
        if self._unreadable or not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                if not self._matches(f):
                    return None
                have = set(f.keys())
                missing = [n for n in names if n not in have]
                if missing:
                    raise KeyError(f"no tensor {missing[0]!r}")
                return {n: f.get_tensor(n) for n in names}
        except Exception as err:  # noqa: BLE001 -- a corrupt cache is never trusted, the data sets still are
            self._warn(err)
            return None

    def valid(self) -> bool:
        """True when the file exists, is readable and was written for this key."""
        if self._unreadable or not self.path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return self._matches(f)
        except Exception as err:  # noqa: BLE001
            self._warn(err)
            return False

    def write(self, tensors: dict) -> Path:
        """Write ``tensors`` with this key (atomically: temp file + ``os.replace``)."""
        save_safetensors_atomic(self.path, tensors, {_META: json.dumps(self.key, sort_keys=True)})
        self._unreadable = False
        return self.path

    def ensure(self, build) -> Path:
        """Write ``build()`` (a dict of tensors) unless a valid file for this key is there already."""
        if not self.valid():
            self.write(build())
        return self.path

    # -- per task: ``{split: (one tensor per field), "n_classes": int}`` ---------------------------------------
    # tensor names: "<task>/<split>/<field>" and "<task>/n_classes" (a 0-d int64 tensor)
    def read_task(self, task: str, fields) -> dict | None:
        """Every split of ``task`` as ``{split: (tensor per field), "n_classes": int}`` from a valid file, else
        None (missing, other settings, unreadable)."""
        names = [f"{task}/{s}/{f}" for s in SPLITS for f in fields] + [f"{task}/n_classes"]
        got = self.read(names)
        if got is None:
            return None
        out = {s: tuple(got[f"{task}/{s}/{f}"] for f in fields) for s in SPLITS}
        out["n_classes"] = int(got[f"{task}/n_classes"])
        return out

    def ensure_tasks(self, tasks, fields, task_data) -> Path:
        """Unless a valid file is there, write ``task_data(task)`` (as :meth:`read_task` returns it) of every
        task."""
        import torch

        def build():
            tensors = {}
            for t in tasks:
                data = task_data(t)
                for s in SPLITS:
                    if len(data[s]) != len(fields):
                        raise ValueError(f"{t}/{s}: {len(data[s])} tensors for fields {list(fields)}")
                    tensors.update({f"{t}/{s}/{f}": v for f, v in zip(fields, data[s])})
                tensors[f"{t}/n_classes"] = torch.tensor(int(data["n_classes"]), dtype=torch.int64)
            return tensors

        return self.ensure(build)


def files_digest(folder: str | Path, names) -> str:
    """sha256 (16 hex digits) of the files ``names`` that exist in ``folder`` (names and contents), e.g. a
    tokenizer's files: its identity in a key."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(names):
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
