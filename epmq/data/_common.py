"""Shared split logic and the ``datasets.DatasetDict`` builders for the embedded data sets.

Split recipe (all loaders): examples are de-duplicated (by exact content) before splitting, so no test
example occurs in train or validation; the test split is either the source's official one or a seeded,
stratified held-out part; validation is a seeded, stratified ``val_frac`` of the capped training pool
(``n_val = round(val_frac * min(len(pool), max_train))``); train is the next ``max_train`` examples of the
remaining pool. Every draw uses ``numpy.random.default_rng(seed)``, so a seed fixes the split exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

from epmq.errors import EPMQError

IMAGE_SHAPE = (28, 28)


def example_hash(x) -> str:
    """Content hash of one example (a uint8 image array or a text string)."""
    if isinstance(x, str):
        return hashlib.sha1(x.encode("utf-8")).hexdigest()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.uint8))
    return hashlib.sha1(a.tobytes()).hexdigest()


def dedupe(xs, ys, exclude: set[str] | None = None) -> np.ndarray:
    """Indices of the first occurrence of each distinct example, dropping any whose hash is in ``exclude``."""
    seen = set(exclude or ())
    keep = []
    for i, x in enumerate(xs):
        h = example_hash(x)
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def stratified_take(y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into (``n`` taken, rest), class proportions kept (largest remainder).

    Both parts come back in a seeded random order.
    """
    y = np.asarray(y)
    n = int(n)
    if n < 0 or n > len(y):
        raise EPMQError(f"cannot take {n} examples out of {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (n / len(y)) if len(y) else counts * 0.0
    take = np.floor(quota).astype(int)
    short = n - int(take.sum())
    if short > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:short]] += 1
    taken, rest = [], []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        taken.append(idx[:k])
        rest.append(idx[k:])
    taken = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    rest = np.concatenate(rest) if rest else np.zeros(0, np.int64)
    return taken[rng.permutation(len(taken))], rest[rng.permutation(len(rest))]


def split_indices(y_pool: np.ndarray, *, seed: int, max_train: int | None, val_frac: float,
                  n_test: int | None = None, y_test: np.ndarray | None = None):
    """Seeded stratified split.

    With ``y_test`` (an official test split) the pool is train+val only and ``n_test`` optionally takes a
    stratified subset of the official test; otherwise ``n_test`` examples are held out of the pool.
    Returns ``(train_idx, val_idx, test_idx)``; test indices refer to the official test arrays when
    ``y_test`` is given, else to the pool.
    """
    if not 0.0 <= val_frac < 1.0:
        raise EPMQError(f"val_frac={val_frac!r} must be in [0, 1)")
    if max_train is not None and max_train < 1:
        raise EPMQError(f"max_train={max_train!r} must be >= 1 or None")
    rng = np.random.default_rng(seed)
    y_pool = np.asarray(y_pool)
    if y_test is not None:
        y_test = np.asarray(y_test)
        if n_test is None or n_test >= len(y_test):
            test_idx = rng.permutation(len(y_test))
        else:
            test_idx, _ = stratified_take(y_test, n_test, rng)
        pool = np.arange(len(y_pool))
    else:
        if n_test is None or not 0 < n_test < len(y_pool):
            raise EPMQError(f"n_test={n_test!r} must be in 1..{len(y_pool) - 1} for a pool of {len(y_pool)}")
        test_idx, pool = stratified_take(y_pool, n_test, rng)
    n_used = len(pool) if max_train is None else min(len(pool), int(max_train))
    n_val = int(round(val_frac * n_used))
    v, rest = stratified_take(y_pool[pool], n_val, rng)
    val_idx = pool[v]
    rest = pool[rest]
    n_train = len(rest) if max_train is None else min(len(rest), int(max_train))
    if n_train < len(rest):
        t, _ = stratified_take(y_pool[rest], n_train, rng)
        train_idx = rest[t]
    else:
        train_idx = rest
    return train_idx, val_idx, test_idx


def _info(description: str, name: str, features):
    import datasets

    return datasets.DatasetInfo(description=description, dataset_name=name, features=features)


def image_dataset_dict(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                       description: str):
    """``DatasetDict`` with ``image`` (Array2D (28, 28) uint8) and ``label`` (ClassLabel) columns."""
    import datasets

    feats = datasets.Features({
        "image": datasets.Array2D(shape=IMAGE_SHAPE, dtype="uint8"),
        "label": datasets.ClassLabel(names=list(class_names)),
    })
    out = {}
    for split, (x, y) in splits.items():
        x = np.ascontiguousarray(x, dtype=np.uint8)
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise EPMQError(f"{name}/{split}: images have shape {x.shape}, expected (N, 28, 28)")
        out[split] = datasets.Dataset.from_dict({"image": x, "label": np.asarray(y, dtype=np.int64)},
                                                features=feats, info=_info(description, name, feats), split=split)
    return datasets.DatasetDict(out)


def text_dataset_dict(name: str, splits: dict[str, tuple[list[str], np.ndarray]], class_names: list[str],
                      description: str):
    """``DatasetDict`` with ``text`` (string) and ``label`` (ClassLabel) columns."""
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=list(class_names))})
    out = {}
    for split, (x, y) in splits.items():
        out[split] = datasets.Dataset.from_dict({"text": [str(t) for t in x], "label": np.asarray(y, dtype=np.int64)},
                                                features=feats, info=_info(description, name, feats), split=split)
    return datasets.DatasetDict(out)


def build_image(name, x_pool, y_pool, class_names, description, *, seed, max_train, val_frac,
                n_test=None, x_test=None, y_test=None):
    """Dedupe, split and wrap image arrays (the official test, when given, is kept and wins over train)."""
    if x_test is not None:
        kt = dedupe(x_test, y_test)
        x_test, y_test = x_test[kt], y_test[kt]
        excl = {example_hash(x) for x in x_test}
    else:
        excl = None
    keep = dedupe(x_pool, y_pool, excl)
    x_pool, y_pool = x_pool[keep], y_pool[keep]
    tr, va, te = split_indices(y_pool, seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test, y_test=y_test)
    xt, yt = (x_test[te], y_test[te]) if x_test is not None else (x_pool[te], y_pool[te])
    return image_dataset_dict(name, {"train": (x_pool[tr], y_pool[tr]), "validation": (x_pool[va], y_pool[va]),
                                     "test": (xt, yt)}, class_names, description)


def build_text(name, texts, labels, class_names, description, *, seed, max_train, val_frac,
               n_test=None, test_texts=None, test_labels=None):
    """Dedupe, split and wrap texts (the official test, when given, is kept and wins over train)."""
    texts = np.asarray(list(texts), dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    if test_texts is not None:
        test_texts = np.asarray(list(test_texts), dtype=object)
        test_labels = np.asarray(test_labels, dtype=np.int64)
        kt = dedupe(test_texts, test_labels)
        test_texts, test_labels = test_texts[kt], test_labels[kt]
        excl = {example_hash(t) for t in test_texts}
    else:
        excl = None
    keep = dedupe(texts, labels, excl)
    texts, labels = texts[keep], labels[keep]
    tr, va, te = split_indices(labels, seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test,
                               y_test=test_labels)
    tt, tl = (test_texts[te], test_labels[te]) if test_texts is not None else (texts[te], labels[te])
    return text_dataset_dict(name, {"train": (list(texts[tr]), labels[tr]), "validation": (list(texts[va]), labels[va]),
                                    "test": (list(tt), tl)}, class_names, description)
