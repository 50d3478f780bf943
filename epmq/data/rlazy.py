"""Read one object out of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``) without R.

``Rdata.rdx`` (an RDS file) maps each object name to ``(offset, length)`` in ``Rdata.rdb``. Each entry
is a 4-byte big-endian uncompressed length, then a type byte: ``Z`` (raw LZMA2 stream, preset
9 | extreme), ``2`` (bzip2), ``0`` (stored), or else the entry is a bare zlib stream starting at byte 4.
The decompressed bytes are a serialized R object that PyPI ``rdata`` parses and converts to pandas.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import warnings
import zlib
from pathlib import Path

from epmq.errors import EPMQError


def _rdata():
    try:
        import rdata
    except ImportError:
        raise EPMQError("reading R data needs the PyPI package 'rdata'; install it with: "
                        "python -m pip install 'rdata>=0.11'") from None
    return rdata


def rdx_index(base: Path) -> dict[str, tuple[int, int]]:
    """``{object name: (offset, length)}`` from ``<base>.rdx``."""
    rdata = _rdata()
    idx = rdata.read_rds(str(base) + ".rdx")
    return {str(k): (int(v[0]), int(v[1])) for k, v in idx["variables"].items()}


def decompress_entry(blob: bytes, *, what: str = "entry") -> bytes:
    if len(blob) < 5:
        raise EPMQError(f"{what}: R lazy-load entry too short ({len(blob)} bytes)")
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    try:
        if kind == b"Z":
            data = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == b"2":
            data = bz2.decompress(blob[5:])
        elif kind == b"0":
            data = blob[5:]
        else:
            data = zlib.decompress(blob[4:])
    except (lzma.LZMAError, OSError, zlib.error) as e:
        raise EPMQError(f"{what}: cannot decompress R lazy-load entry (type {kind!r}): {e}") from None
    if len(data) != n:
        raise EPMQError(f"{what}: decompressed {len(data)} bytes, header says {n}")
    return data


def read_object(base: Path, name: str):
    """Object ``name`` from the lazy-load DB at ``base`` (path without ``.rdx``/``.rdb``), as pandas."""
    rdata = _rdata()
    index = rdx_index(base)
    if name not in index:
        raise EPMQError(f"{base}.rdx: no object {name!r} (has {sorted(index)})")
    off, ln = index[name]
    with open(str(base) + ".rdb", "rb") as f:
        f.seek(off)
        blob = f.read(ln)
    data = decompress_entry(blob, what=f"{base}.rdb[{name}]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS", POSIXct constructors
        parsed = rdata.parser.parse_data(data)
        return rdata.conversion.convert(parsed)
