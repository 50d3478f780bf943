"""epmq.io: the one atomic-write protocol (same bytes, umask mode, no temp left on any failure, one-line
errors for a read-only folder or a full disk), the safetensors header reader and loader, and the package
data an installed wheel needs."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

import epmq.io as eio
from epmq.errors import EPMQError
from epmq.io import (
    SafetensorsStream,
    atomic_path,
    load_safetensors,
    read_safetensors_header,
    save_safetensors_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
TENSORS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
           "h": torch.ones(4, dtype=torch.float16)}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


# -------------------------------------------------------------------------------------------------- bytes


def test_writers_write_the_expected_bytes(tmp_path):
    obj = {"b": [1, 2.5], "a": "é"}
    assert write_json_atomic(tmp_path / "r.json", obj).read_bytes() == \
        (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    assert write_text_atomic(tmp_path / "t.md", "λ\nx\r\n").read_bytes() == "λ\nx\r\n".encode("utf-8")
    assert write_bytes_atomic(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    meta = {"k": "v"}
    got = save_safetensors_atomic(tmp_path / "m.safetensors", TENSORS, meta).read_bytes()
    assert got == save(TENSORS, metadata=meta)
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in TENSORS.items()}
    with SafetensorsStream(tmp_path / "s.safetensors", layout, meta) as w:
        for k in w.order:
            w.write(k, TENSORS[k])
    assert (tmp_path / "s.safetensors").read_bytes() == got
    assert _entries(tmp_path) == ["b.bin", "m.safetensors", "r.json", "s.safetensors", "t.md"]  # no temp left


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "x.json"  # missing folders are made
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2} and _entries(path.parent) == ["x.json"]


# -------------------------------------------------------------------------------------------------- modes


def test_files_get_the_users_umask_mode_not_0600(tmp_path, umask_027):
    """mkstemp and safetensors' save_file make 0600 files; every writer here gives 0o666 & ~umask."""
    want = 0o666 & ~umask_027
    paths = [write_json_atomic(tmp_path / "a.json", {}), write_text_atomic(tmp_path / "a.txt", "x"),
             save_safetensors_atomic(tmp_path / "a.safetensors", TENSORS)]
    with SafetensorsStream(tmp_path / "s.safetensors", {"x": (torch.float32, (1,))}) as w:
        w.write("x", torch.zeros(1))
    paths.append(tmp_path / "s.safetensors")
    with atomic_path(tmp_path / "raw.safetensors") as tmp:
        save_file(TENSORS, str(tmp))  # a writer that replaces the temp with its own 0600 file
    paths.append(tmp_path / "raw.safetensors")
    assert {p.name: oct(_mode(p)) for p in paths} == {p.name: oct(want) for p in paths}


def test_folders_get_the_umask_mode_and_replace_an_old_one(tmp_path, umask_027):
    out = tmp_path / "export"
    (out / "stale").mkdir(parents=True)
    with atomic_path(out, folder=True) as tmp:
        (tmp / "sub").mkdir()
        save_file(TENSORS, str(tmp / "sub" / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
    assert _entries(out) == ["config.json", "sub"] and _entries(tmp_path) == ["export"]
    assert _mode(out) == _mode(out / "sub") == 0o777 & ~umask_027
    assert _mode(out / "sub" / "model.safetensors") == _mode(out / "config.json") == 0o666 & ~umask_027


def test_keep_existing_keeps_what_another_process_wrote_first(tmp_path):
    out = tmp_path / "cache"
    with atomic_path(out, folder=True, keep_existing=True) as tmp:
        (tmp / "mine").write_text("1")
        out.mkdir()
        (out / "theirs").write_text("2")
    assert _entries(out) == ["theirs"] and _entries(tmp_path) == ["cache"]


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_writer_leaves_neither_file_nor_temp(tmp_path, exc):
    with pytest.raises(type(exc)):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    with pytest.raises(type(exc)):
        with atomic_path(tmp_path / "d", folder=True) as tmp:
            (tmp / "f").write_text("partial")
            raise exc
    layout = {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}
    with pytest.raises(type(exc)):
        with SafetensorsStream(tmp_path / "s.safetensors", layout) as w:
            w.write(w.order[0], torch.zeros(2))
            raise exc
    assert _entries(tmp_path) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": ')
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"v": 1} and _entries(tmp_path) == ["r.json"]


class _FullDisk:
    """A file whose every write fails as on a full disk (the rest is the real file)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):  # noqa: ARG002
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _full_disk(monkeypatch):
    """Every file epmq.io opens from now on is on a full disk."""
    real_open, real_fdopen = open, os.fdopen
    monkeypatch.setattr(eio, "open", lambda *a, **k: _FullDisk(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(eio.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)))


def test_disk_full_is_one_line_naming_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(EPMQError, match=r"^\S*r\.json: cannot write \(disk full\)$"):
        write_json_atomic(tmp_path / "r.json", {"v": 1})
    with pytest.raises(EPMQError, match=r"s\.safetensors: cannot write \(disk full\)$"):
        SafetensorsStream(tmp_path / "s.safetensors", {"x": (torch.float32, (1,))})
    monkeypatch.undo()
    assert _entries(tmp_path) == []


def test_disk_full_in_a_stream_discards_its_temp(tmp_path, monkeypatch):
    writer = SafetensorsStream(tmp_path / "s.safetensors", {"x": (torch.float32, (4,))})
    writer._file = _FullDisk(writer._file)  # the disk fills up after the header
    with pytest.raises(EPMQError, match=r"s\.safetensors: cannot write \(disk full\)$"):
        writer.write("x", torch.zeros(4))
    writer.discard()  # what the callers' cleanup does next: harmless twice
    assert _entries(tmp_path) == []


def test_disk_full_reported_by_safetensors_is_the_same_line(tmp_path, monkeypatch):
    """save_file reports I/O errors as SafetensorError("... (os error 28)"), with no errno."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):  # noqa: ARG001
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(EPMQError, match=r"m\.safetensors: cannot write \(disk full\)$"):
        save_safetensors_atomic(tmp_path / "m.safetensors", TENSORS)
    assert _entries(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders (chmod does not stop it)")
def test_read_only_folder_fails_before_writing_and_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        calls = []
        with pytest.raises(EPMQError, match=r"^\S*ro/x\.json: cannot write \(read-only folder\)$"):
            with atomic_path(folder / "x.json"):
                calls.append(1)  # never reached: the temp is made first
        assert calls == []
        with pytest.raises(EPMQError, match=r"ro/s\.safetensors: cannot write \(read-only folder\)$"):
            SafetensorsStream(folder / "s.safetensors", {"x": (torch.float32, (1,))})
        with pytest.raises(EPMQError, match=r"ro/out: cannot write \(read-only folder\)$"):
            with atomic_path(folder / "out", folder=True):
                pass
        assert _entries(folder) == []
    finally:
        folder.chmod(0o755)


def test_read_only_errno_maps_to_one_line(tmp_path, monkeypatch):
    """The same check as above where it cannot run (as root): the temp's creation is refused."""
    def refuse(*args, **kwargs):  # noqa: ARG001
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(eio.os, "open", refuse)
    with pytest.raises(EPMQError, match=r"x\.json: cannot write \(read-only folder\)$"):
        write_json_atomic(tmp_path / "x.json", {})
    monkeypatch.setattr(eio.os, "mkdir", lambda *a, **k: refuse())
    with pytest.raises(EPMQError, match=r"out: cannot write \(read-only folder\)$"):
        with atomic_path(tmp_path / "out", folder=True):
            pass
    monkeypatch.undo()
    assert _entries(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError):  # a permission error in the body may concern another file: not renamed
        with atomic_path(tmp_path / "x.json"):
            raise PermissionError(errno.EACCES, "Permission denied", "/some/input")
    layout = {"a": (torch.float32, (1,)), "b": (torch.float32, (1,))}
    with pytest.raises(ValueError, match="written out of order"):
        with SafetensorsStream(tmp_path / "s.safetensors", layout) as w:
            w.write("b", torch.zeros(1))
    assert _entries(tmp_path) == []


# --------------------------------------------------------------------------------------------------- reads


def test_header_reader_matches_the_file(tmp_path):
    path = save_safetensors_atomic(tmp_path / "m.safetensors", TENSORS, {"k": "v"})
    h = read_safetensors_header(path)
    assert h.metadata == {"k": "v"} and set(h.tensors) == set(TENSORS)
    raw = path.read_bytes()
    assert h.data_start == 8 + int.from_bytes(raw[:8], "little")
    for k, t in TENSORS.items():
        dtype, shape, b, e = h.tensors[k]
        assert shape == tuple(t.shape) and h.nbytes(k) == t.numel() * t.element_size()
        assert raw[h.data_start + b:h.data_start + e] == t.numpy().tobytes()
    assert h.nbytes("absent") == 0


@pytest.mark.parametrize("content, message", [
    (None, r"missing \(no such safetensors file\)"),
    (b"\x01\x02", r"not a readable safetensors file \(bad header length\)"),
    (b"\x10" + bytes(7) + b"not json at all!", r"not a readable safetensors file \(header: "),
    (b"\x08" + bytes(7) + b"[1, 2]  ", r"not a readable safetensors file \(header is not an object\)"),
])
def test_header_reader_names_a_bad_file(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EPMQError, match=r"bad\.safetensors: " + message):
        read_safetensors_header(path)
    with pytest.raises(EPMQError, match=r"bad\.safetensors: (missing|not a readable safetensors file)"):
        load_safetensors(path)


def test_load_safetensors_reads_every_tensor(tmp_path):
    got = load_safetensors(save_safetensors_atomic(tmp_path / "m.safetensors", TENSORS))
    assert got.keys() == TENSORS.keys() and all(torch.equal(got[k], v) for k, v in TENSORS.items())


def test_stderr_isatty_never_raises(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    assert eio.stderr_isatty() is False


# --------------------------------------------------------------------------------------------- package data


def test_config_schema_is_package_data():
    """The library reads the schema from inside the package, and the wheel ships it."""
    import epmq
    import epmq.config

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    path = epmq.config.schema_path()
    assert path.is_file() and Path(epmq.__file__).parent in path.parents
    rel = path.relative_to(Path(epmq.__file__).parent).as_posix()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["epmq"]
    assert any(Path(rel).match(pattern) for pattern in data), (rel, data)
    assert epmq.config._schema()["properties"]


def test_a_job_checks_its_output_folders_before_any_work(tmp_path, monkeypatch):
    """``pipeline.job`` (every rule's script) probes each output folder and the free space first: a refused
    folder or a full disk is one line at the job's start, ending its log, and nothing is left behind."""
    from types import SimpleNamespace

    from epmq.pipeline import job

    out = tmp_path / "res" / "merged" / "m.safetensors"
    out.parent.mkdir(parents=True)
    sm = SimpleNamespace(log=[str(tmp_path / "logs" / "m.log")], output=[str(out)], resources=SimpleNamespace(gpu=0))
    with job(sm):
        pass  # a writable folder with room: the job runs
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=4096))
    ran = []
    with pytest.raises(EPMQError, match=r"merged: cannot write \(disk full: 4 KB free\)$"):
        with job(sm):
            ran.append(1)
    assert ran == [] and _entries(out.parent) == []
    assert "cannot write (disk full" in (tmp_path / "logs" / "m.log").read_text()
    monkeypatch.undo()

    def refuse(*args, **kwargs):  # noqa: ARG001
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(eio.os, "open", refuse)
    with pytest.raises(EPMQError, match=r"\.epmq-write-probe: cannot write \(read-only folder\)$"):
        with job(sm):
            ran.append(1)
    assert ran == []
