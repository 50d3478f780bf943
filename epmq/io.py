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


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
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


#: torch dtype name -> safetensors dtype name, in the order of safetensors' own ``Dtype`` enum: ``save_file``
#: lays the tensors out by that rank, largest first, then by name, and so does :class:`SafetensorsStream`
_ST_NAMES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
             "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32",
             "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_NAMES)}


class SafetensorsStream:
    """Write a .safetensors file one tensor at a time, without the tensors ever being in memory together.

    ``layout`` maps every key to its ``(torch dtype, shape)``; the header (offsets included) is written first,
    then :meth:`write` appends each tensor's bytes in :attr:`order`, the order ``safetensors`` lays tensors
    out in (by dtype, the wider first, then by name). The bytes are those ``safetensors.torch.save_file`` writes for
    the same tensors and ``metadata`` (when there is at most one metadata entry: ``save_file`` orders several
    at random; here they keep their order).

    The data goes to a temp file beside ``path`` (a unique name, so several streams to one path may be open);
    :meth:`commit` fsyncs it and renames it to ``path``, :meth:`discard` deletes it. As a context manager,
    a clean exit commits and an exception discards, so a failed write never leaves a partial ``path``.
    """

    def __init__(self, path: str | Path, layout, metadata: dict | None = None):
        import math
        import tempfile

        self.path = Path(path)
        entries = []  # (-rank, key, safetensors dtype, torch dtype, shape)
        for key, (dtype, shape) in layout.items():
            tname = str(dtype).removeprefix("torch.")
            if tname not in _ST_NAMES:
                raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
            entries.append((-_ST_RANK[tname], key, _ST_NAMES[tname], dtype, tuple(map(int, shape))))
        entries.sort(key=lambda e: e[:2])
        header, offset, self._expect = {}, 0, []
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for _, key, name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expect.append((key, dtype, shape, nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to a multiple of 8 bytes
        #: the keys in the order :meth:`write` takes them (the file's data order)
        self.order = tuple(e[0] for e in self._expect)
        self._next = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        try:
            self._file.write(len(text).to_bytes(8, "little") + text)
        except BaseException:
            self.discard()
            raise

    def write(self, key: str, tensor) -> None:
        """Append ``tensor`` (any device, any strides), which must be the next key of :attr:`order`."""
        import sys

        import torch

        if self._file is None:
            raise ValueError(f"{self.path}: stream already closed")
        if self._next >= len(self._expect):
            raise ValueError(f"{key}: every tensor of {self.path.name} is written already")
        want, dtype, shape, nbytes = self._expect[self._next]
        if key != want:
            raise ValueError(f"{key}: written out of order, {self.path.name} expects {want!r} next")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, the header says {shape} {dtype}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if nbytes:
            raw = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(
                {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
            array = raw.numpy()
            if sys.byteorder != "little":  # safetensors stores little-endian
                array = array.byteswap()
            self._file.write(memoryview(array).cast("B"))
        self._next += 1

    def finish(self) -> Path:
        """Check every tensor was written, flush and fsync the temp file (still under its temp name)."""
        if self._file is not None:
            if self._next != len(self._expect):
                raise ValueError(f"{self.path.name}: {len(self._expect) - self._next} tensor(s) not written, "
                                 f"next {self._expect[self._next][0]!r}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self.tmp

    def commit(self) -> Path:
        """Finish, then rename the file to ``path`` (and fsync its folder where the OS allows)."""
        self.finish()
        os.replace(self.tmp, self.path)
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:  # Windows: folders cannot be opened
            return self.path
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        return self.path

    def discard(self) -> None:
        """Close and delete the temp file (nothing is renamed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()
        return False
