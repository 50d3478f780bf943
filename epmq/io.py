"""Files in and out, in one place: atomic writes, the safetensors header, loading a state dict.

Writes. Every artefact goes through one protocol, :class:`PendingFile`: a temp file (or folder) is created
beside the target (same folder, so the final rename never crosses file systems), the writer fills it, then
:meth:`PendingFile.commit` fsyncs it, gives it the user's umask mode (``0o666 & ~umask``, ``0o777`` for
folders -- ``mkstemp`` and safetensors' ``save_file`` create 0600 files, which surprises users sharing a
results folder), renames it over the target and fsyncs the folder. Any failure, ``KeyboardInterrupt``
included, deletes the temp, so an interrupted job never leaves a partial file nor a stray temp behind.

* :func:`atomic_path` -- ``with atomic_path(path) as tmp:`` for writers that take a path (``save_file``,
  ``save_to_disk``); ``folder=True`` builds a whole folder and replaces an old one.
* :func:`write_bytes_atomic`, :func:`write_text_atomic` (UTF-8), :func:`write_json_atomic` (indented,
  key-sorted), :func:`save_safetensors_atomic` on top of it.
* :class:`SafetensorsStream` -- a safetensors file written one tensor at a time through the same protocol.

A folder that cannot be written (read-only, no permission) or a full disk is one line,
:class:`~epmq.errors.EPMQError` ``"<path>: cannot write (read-only folder)"`` / ``"<path>: cannot write
(disk full)"``; the read-only case is found when the temp is created, before any data is produced.

Reads. :func:`read_safetensors_header` parses and checks a safetensors header (offsets inside the file, byte
counts matching shapes and dtypes) without reading tensor data; :func:`load_safetensors` loads a whole
file with one-line errors for a missing or unreadable file. :func:`stderr_isatty` decides whether progress
bars are drawn.

This module imports nothing of epmq but :mod:`epmq.errors`, so every layer (``epmq.quant``, ``epmq.merge``
included) may use it; torch and safetensors are imported where needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from epmq.errors import EPMQError

# ------------------------------------------------------------------------------------------ atomic writes

#: errno values that mean "this folder cannot be written" and "no space left"
_READ_ONLY = {errno.EACCES: "read-only folder", errno.EPERM: "read-only folder",
              errno.EROFS: "read-only file system"}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting it and putting it back (the
    only portable way; another thread creating a file in between would get 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(err: BaseException) -> bool:
    # safetensors' save_file reports an I/O error as SafetensorError("... (os error 28)"), without errno
    return getattr(err, "errno", None) in _FULL or any(f"(os error {c})" in str(err) for c in _FULL)


@contextlib.contextmanager
def _on_failure(path: Path, discard=None, *, read_only: bool = True):
    """On any failure inside: call ``discard`` (deletes the temp), then raise a full disk -- and, with
    ``read_only``, a refused write -- as the one-line :class:`EPMQError` naming ``path``; other errors
    pass unchanged."""
    try:
        yield
    except BaseException as err:
        if discard is not None:
            discard()
        if _disk_full(err):
            raise EPMQError(f"{path}: cannot write (disk full)") from err
        if read_only and isinstance(err, OSError) and err.errno in _READ_ONLY:
            raise EPMQError(f"{path}: cannot write ({_READ_ONLY[err.errno]})") from err
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the OS allows (Windows cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class PendingFile:
    """A temp file (``folder=True``: a temp folder) beside ``path`` that becomes ``path`` on :meth:`commit`.

    The temp gets a unique name (``.<name>.<random>.tmp``), so several writers of one path may be pending at
    once; :attr:`fd` is an open, writable descriptor of a temp file (None for a folder, or once closed).
    :meth:`discard` deletes the temp; :attr:`synced` tells :meth:`commit` the writer fsynced it already.
    A folder that cannot be written raises the one-line :class:`EPMQError` here, before the caller computes
    anything to write; a full disk or a refused rename raises it from :meth:`commit`."""

    def __init__(self, path: str | os.PathLike, *, folder: bool = False):
        self.path, self.folder, self.fd = Path(path), folder, None
        self.synced = False  # set by a writer that fsynced the temp itself
        with _on_failure(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                self.tmp = self.path.with_name(f".{self.path.name}.{os.urandom(4).hex()}.tmp")
                try:
                    if folder:
                        os.mkdir(self.tmp, 0o777)
                    else:
                        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                        self.fd = os.open(self.tmp, flags, 0o666)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(errno.EEXIST, "no free temp name", str(self.path))

    def close(self) -> None:
        """Close :attr:`fd` (the temp file stays)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def commit(self, *, keep_existing: bool = False) -> Path:
        """fsync the temp, give it the umask mode, rename it to ``path``. An old ``path`` is replaced, or with
        ``keep_existing`` kept (the temp is then deleted: another process wrote the same thing first). On
        failure the temp is deleted."""
        with _on_failure(self.path, self.discard):
            return self._commit(keep_existing)

    def _commit(self, keep_existing: bool) -> Path:
        if keep_existing and self.path.exists():
            self.discard()
            return self.path
        mask = _umask()
        if self.folder:
            for sub in sorted(self.tmp.rglob("*")):
                if sub.is_file() and not sub.is_symlink():
                    _fsync_file(sub)
                    os.chmod(sub, 0o666 & ~mask)
                elif sub.is_dir() and not sub.is_symlink():
                    os.chmod(sub, 0o777 & ~mask)
            os.chmod(self.tmp, 0o777 & ~mask)
            self._replace_folder(keep_existing)
        else:
            if self.fd is not None:
                os.fsync(self.fd)
                self.close()
            elif not self.synced:  # the writer had the path: open it again (it may be a new file of the writer's)
                _fsync_file(self.tmp)
            os.chmod(self.tmp, 0o666 & ~mask)
            os.replace(self.tmp, self.path)
        _fsync_folder(self.path.parent)
        return self.path

    def _replace_folder(self, keep_existing: bool) -> None:
        if not self.path.exists() or keep_existing:
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                if not (keep_existing and self.path.exists()):
                    raise
                self.discard()  # another process renamed its copy into place meanwhile: keep theirs
            return
        old = self.path.with_name(f".{self.path.name}.old{os.urandom(4).hex()}")
        os.replace(self.path, old)  # a folder cannot be renamed over a non-empty one: move the old aside first
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Close and delete the temp (nothing is renamed); safe to call twice."""
        self.close()
        if self.folder:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, folder: bool = False, keep_existing: bool = False):
    """``with atomic_path(path) as tmp:`` -- write to the temp path ``tmp`` (a file, or with ``folder=True``
    an empty folder, beside ``path``); a clean exit commits it to ``path`` (:class:`PendingFile`), any
    exception or interrupt deletes it. ``keep_existing``: when ``path`` exists by then (another process
    wrote it first), the temp is deleted and the existing ``path`` kept. A read-only folder or a full disk
    raises the one-line :class:`EPMQError`."""
    pending = PendingFile(path, folder=folder)
    pending.close()
    # only a full disk is translated in the body: a permission error there may concern another file
    with _on_failure(pending.path, pending.discard, read_only=False):
        yield pending.tmp
    pending.commit(keep_existing=keep_existing)


#: below this much free space a job stops before computing (a write of any artefact would fail)
MIN_FREE_BYTES = 1 << 20


def check_writable(paths) -> None:
    """Each of ``paths``' folders can take a new file: a probe temp is created there and removed, and the disk
    has at least :data:`MIN_FREE_BYTES` free. What a job calls before computing, so a read-only results folder
    or a full disk is one line naming the path at its start, not after an hour of work."""
    import shutil

    for folder in dict.fromkeys(Path(p).parent for p in paths):
        PendingFile(folder / ".epmq-write-probe").discard()
        free = shutil.disk_usage(folder).free
        if free < MIN_FREE_BYTES:
            raise EPMQError(f"{folder}: cannot write (disk full: {free // 1024} KB free)")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 (line ends as given), never leaving a partial file."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (never a partial file)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Save ``tensors`` (detached, contiguous, on CPU) as safetensors with string ``metadata``."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={k: str(v) for k, v in (metadata or {}).items()} or None,
        )
    return path


# ----------------------------------------------------------------------------------------------- safetensors

#: (torch dtype name, safetensors dtype name, bytes per element), in the order of safetensors' own ``Dtype``
#: enum: ``save_file`` lays the tensors out by that rank, largest first, then by name, and so does
#: :class:`SafetensorsStream`
_ST_TABLE = (("bool", "BOOL", 1), ("uint8", "U8", 1), ("int8", "I8", 1), ("float8_e5m2", "F8_E5M2", 1),
             ("float8_e4m3fn", "F8_E4M3", 1), ("int16", "I16", 2), ("uint16", "U16", 2), ("float16", "F16", 2),
             ("bfloat16", "BF16", 2), ("int32", "I32", 4), ("uint32", "U32", 4), ("float32", "F32", 4),
             ("float64", "F64", 8), ("int64", "I64", 8), ("uint64", "U64", 8))
_ST_NAMES = {t: s for t, s, _ in _ST_TABLE}  # torch dtype name -> safetensors dtype name
_ST_RANK = {t: rank for rank, (t, _, _) in enumerate(_ST_TABLE)}
#: safetensors dtype name -> (torch dtype name, bytes per element)
ST_DTYPES = {s: (t, size) for t, s, size in _ST_TABLE}
#: the largest header :func:`read_safetensors_header` accepts (safetensors' own limit is 100 MB)
MAX_HEADER = 100 * 2**20


class SafetensorsStream:
    """Write a .safetensors file one tensor at a time, without the tensors ever being in memory together.

    ``layout`` maps every key to its ``(torch dtype, shape)``; the header (offsets included) is written first,
    then :meth:`write` appends each tensor's bytes in :attr:`order`, the order ``safetensors`` lays tensors
    out in (by dtype, the wider first, then by name). The bytes are those ``safetensors.torch.save_file`` writes for
    the same tensors and ``metadata`` (when there is at most one metadata entry: ``save_file`` orders several
    at random; here they keep their order).

    The data goes to a :class:`PendingFile` beside ``path`` (a unique name, so several streams to one path may
    be open); :meth:`commit` fsyncs it and renames it to ``path``, :meth:`discard` deletes it. As a context
    manager, a clean exit commits and an exception discards, so a failed write never leaves a partial ``path``.
    A full disk discards the temp and raises the one-line :class:`EPMQError`.
    """

    def __init__(self, path: str | Path, layout, metadata: dict | None = None):
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
        self._pending = PendingFile(self.path)
        self.tmp = self._pending.tmp
        self._file = os.fdopen(self._pending.fd, "wb")
        self._pending.fd = None  # the file object owns the descriptor now
        with self._guard():
            self._file.write(len(text).to_bytes(8, "little") + text)

    def _guard(self):
        """Discard the temp on any failure of the file itself; a full disk becomes the one-line error."""
        return _on_failure(self.path, self.discard)

    def write(self, key: str, tensor) -> None:
        """Append ``tensor`` (any device, any strides), which must be the next key of :attr:`order`."""
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
            with self._guard():
                self._file.write(memoryview(array).cast("B"))
        self._next += 1

    def finish(self) -> Path:
        """Check every tensor was written, flush and fsync the temp file (still under its temp name)."""
        if self._file is not None:
            if self._next != len(self._expect):
                raise ValueError(f"{self.path.name}: {len(self._expect) - self._next} tensor(s) not written, "
                                 f"next {self._expect[self._next][0]!r}")
            with self._guard():
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            self._file = None
            self._pending.synced = True
        return self.tmp

    def commit(self) -> Path:
        """Finish, then rename the file to ``path`` (and fsync its folder where the OS allows)."""
        self.finish()
        with self._guard():
            return self._pending.commit()

    def discard(self) -> None:
        """Close and delete the temp file (nothing is renamed)."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk fails the flush of the last buffer
                self._file.close()
            self._file = None
        self._pending.discard()

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


# ----------------------------------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header, checked against the file's size.

    ``tensors`` maps each key to ``(safetensors dtype, shape, begin, end)``; ``begin``/``end`` are byte
    offsets relative to :attr:`data_start` (= 8 + the header's length), in the file's order.
    ``metadata`` is the string ``__metadata__`` (empty when the file has none); ``raw`` the header's JSON
    object as parsed (``__metadata__`` included)."""

    path: Path
    tensors: dict
    metadata: dict
    data_start: int
    raw: dict

    def nbytes(self, key: str) -> int:
        """Bytes of tensor ``key`` (0 for a key the file does not hold)."""
        e = self.tensors.get(key)
        return 0 if e is None else e[3] - e[2]


def _not_readable(path: Path, why: str) -> EPMQError:
    return EPMQError(f"{path}: not a readable safetensors file ({why})")


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file ``path`` (no tensor data is read): the header
    length fits the file, the header is a JSON object, and every entry has a known dtype, a shape and data
    offsets inside the file whose byte count matches the shape. Each failure is one line naming the file
    (and the tensor)."""
    path = Path(path)
    if not path.is_file():
        raise EPMQError(f"{path}: missing (no such safetensors file)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise _not_readable(path, "bad header length")
            header = json.loads(f.read(n))
    except OSError as err:
        raise _not_readable(path, f"{type(err).__name__}: {err}") from err
    except ValueError as err:  # JSON or UTF-8
        if isinstance(err, EPMQError):
            raise
        raise _not_readable(path, f"header: {err}") from err
    if not isinstance(header, dict):
        raise _not_readable(path, "header is not an object")
    meta = header.get("__metadata__") or {}
    start, tensors = 8 + n, {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (b, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise EPMQError(f"{path}: tensor {key!r}: malformed header entry") from err
        if dtype not in ST_DTYPES:
            raise EPMQError(f"{path}: tensor {key!r}: unsupported dtype {dtype!r}")
        if not (isinstance(b, int) and isinstance(end, int) and 0 <= b <= end <= size - start) \
                or any(d < 0 for d in shape):
            raise EPMQError(f"{path}: tensor {key!r}: data offsets outside the file (truncated?)")
        if end - b != math.prod(shape) * ST_DTYPES[dtype][1]:
            raise EPMQError(f"{path}: tensor {key!r}: {end - b} bytes for shape {shape} {dtype}")
        tensors[key] = (dtype, tuple(shape), b, end)
    return SafetensorsHeader(path, tensors, meta, start, header)


def load_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of the safetensors file ``path``, on the CPU; a missing or unreadable file is one line."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EPMQError(f"{path}: missing (no such safetensors file)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ...
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise _not_readable(path, f"{type(err).__name__}: {first}") from err


def stderr_isatty() -> bool:
    """Whether stderr is a terminal (progress bars are drawn only then); False when stderr is missing,
    closed or replaced by an object without ``isatty``."""
    try:
        return bool(sys.stderr.isatty())
    except Exception:  # noqa: BLE001 -- None, closed (ValueError), a stand-in without isatty
        return False
