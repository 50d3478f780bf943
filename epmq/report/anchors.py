"""Quoted reference numbers ("anchors"): accuracies copied from papers or FusionBench, shown beside ours.

They are checked here, ordered like our rows and tabulated on their own (``quoted_table``, ``quoted_csv_rows``).
Nothing else in the report sees them: they never enter an Avg, a † mark, a Δ column or a figure.

An anchor is ``{label, source, model, merge, method, bits, value, tasks}``: ``label`` names who reported it
(e.g. "FusionBench"), ``source`` the citation or URL, ``model`` one of base / expert / merged / quantized (as in
the run records), ``value`` the quoted mean accuracy (%) and ``tasks`` optional per-task accuracies (%).
"""

from __future__ import annotations

import math

from epmq.errors import EPMQError
from epmq.report.names import (
    DASH,
    MODEL_ORDER,
    merge_name,
    method_name,
    method_rank,
    none_first,
)
from epmq.report.tables import Cell, Table

ANCHOR_KEYS = ("label", "source", "model", "merge", "method", "bits", "value", "tasks")
REQUIRED_KEYS = ("label", "source", "model", "value")
QUOTED_HEADING = "Quoted from the literature (not reproduced here)"
#: ``metric`` of the CSV row that carries an anchor's ``value`` (its per-task rows are ``accuracy``).
MEAN_METRIC = "mean_accuracy"


def _fail(where: str, msg: str):
    raise EPMQError(f"{where}: {msg}")


def _bad(where: str, key: str, value, what: str):
    raise EPMQError(f"{where}.{key}={value!r}: expected {what}")


def _is_pct(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= 100


def _text(entry: dict, key: str, where: str, *, required: bool) -> str | None:
    v = entry.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        _bad(where, key, v, "a non-empty string" + ("" if required else " or null"))
    return v


def normalize_anchor(entry, where: str) -> dict:
    """One anchor, checked (one-line :class:`EPMQError` naming ``where``) and with every key present."""
    if not isinstance(entry, dict):
        _fail(where, f"expected a mapping with keys {list(REQUIRED_KEYS)}, got {type(entry).__name__}")
    for key in entry:
        if key not in ANCHOR_KEYS:
            _fail(where, f"unknown key {key!r} (expected some of {list(ANCHOR_KEYS)})")
    for key in REQUIRED_KEYS:
        if entry.get(key) is None:
            _fail(where, f"missing key {key!r}")
    label = _text(entry, "label", where, required=True)
    source = _text(entry, "source", where, required=True)
    model = entry["model"]
    if model not in MODEL_ORDER:
        _bad(where, "model", model, f"one of {list(MODEL_ORDER)}")
    merge = _text(entry, "merge", where, required=False)
    method = _text(entry, "method", where, required=False)
    bits = entry.get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 1):
        _bad(where, "bits", bits, "a positive integer or null")
    value = entry["value"]
    if not _is_pct(value):
        _bad(where, "value", value, "a mean accuracy (%) in [0, 100]")
    tasks = entry.get("tasks")
    if tasks is None:
        tasks = {}
    if not isinstance(tasks, dict):
        _bad(where, "tasks", tasks, "a mapping task -> accuracy (%)")
    for t, acc in tasks.items():
        if not isinstance(t, str) or not t:
            _fail(f"{where}.tasks", f"task name {t!r} is not a non-empty string")
        if not _is_pct(acc):
            _bad(f"{where}.tasks", t, acc, "an accuracy (%) in [0, 100]")
    # the same rules as the run records: what the model kind needs and what it cannot have
    if model in ("merged", "quantized") and merge is None:
        _fail(where, f"model={model!r} needs merge (the merge method)")
    if model in ("base", "expert") and merge is not None:
        _fail(where, f"merge={merge!r} on a model={model!r} anchor")
    if model == "quantized":
        for key, val in (("method", method), ("bits", bits)):
            if val is None:
                _fail(where, f"model='quantized' needs {key}")
    else:
        for key, val in (("method", method), ("bits", bits)):
            if val is not None:
                _fail(where, f"{key}={val!r} on a model={model!r} anchor: only quantized ones have one")
    return {
        "label": label,
        "source": source,
        "model": model,
        "merge": merge,
        "method": method,
        "bits": bits,
        "value": value,
        "tasks": {t: tasks[t] for t in sorted(tasks)},
    }


def anchor_sort_key(a: dict) -> tuple:
    """The order of our own rows (base, experts, merged, quantized by merge / method / bits), then the label."""
    return (
        MODEL_ORDER[a["model"]],
        none_first(a["merge"]),
        method_rank(a["method"]) if a["method"] is not None else (-1, ""),
        none_first(a["bits"]),
        a["label"],
        a["source"],
    )


def normalize_anchors(anchors, where: str = "anchors") -> dict[str, list[dict]]:
    """``{suite: [anchor, ...]}`` checked, suites sorted, each list in :func:`anchor_sort_key` order (ties keep
    their given order). None means no anchors."""
    if anchors is None:
        return {}
    if not isinstance(anchors, dict):
        _fail(where, f"expected a mapping suite id -> list of quoted numbers, got {type(anchors).__name__}")
    out = {}
    for suite in sorted(anchors, key=str):
        entries = anchors[suite]
        if not isinstance(suite, str) or not suite:
            _fail(where, f"suite id {suite!r} is not a non-empty string")
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            _fail(f"{where}.{suite}", f"expected a list of quoted numbers, got {type(entries).__name__}")
        checked = [normalize_anchor(e, f"{where}.{suite}[{i}]") for i, e in enumerate(entries)]
        out[suite] = sorted(checked, key=anchor_sort_key)
    return out


def fmt_quoted(x) -> str:
    """A quoted number as it was given (shortest round-trip text): 48.2 -> "48.2", 90 -> "90"."""
    return str(x) if isinstance(x, int) else repr(float(x))


def anchor_what(a: dict) -> str:
    """What the number is of: "Base (zero-shot)", "FP Task Arithmetic", "GPTQ 4-bit on Task Arithmetic"."""
    if a["model"] == "base":
        return "Base (zero-shot)"
    if a["model"] == "expert":
        return "Experts (each on its own task)"
    if a["model"] == "merged":
        return f"FP {merge_name(a['merge'])}"
    return f"{method_name(a['method'])} {a['bits']}-bit on {merge_name(a['merge'])}"


def anchor_tasks(entries: list[dict]) -> list[str]:
    return sorted({t for a in entries for t in a["tasks"]})


def quoted_table(entries: list[dict]):
    """The per-suite table of quoted numbers: who, what, the quoted Avg, per-task values if any, the source."""
    tasks = anchor_tasks(entries)
    t = Table(["Quoted from", "What", "Avg", *tasks, "Source"], css_class="quoted")
    for a in entries:
        cells = [Cell(a["label"]), Cell(anchor_what(a)), Cell(fmt_quoted(a["value"]), num=True)]
        cells += [Cell(fmt_quoted(a["tasks"][x]) if x in a["tasks"] else DASH, num=True) for x in tasks]
        t.add([*cells, Cell(a["source"])])
    return t


def quoted_csv_rows(anchors: dict[str, list[dict]]) -> list[dict]:
    """Per anchor: one ``mean_accuracy`` row (task empty), then one ``accuracy`` row per quoted task."""
    rows = []
    for suite, entries in anchors.items():
        for a in entries:
            base = {
                "suite": suite,
                "model": a["model"],
                "merge": a["merge"],
                "method": a["method"],
                "bits": a["bits"],
                "origin": "quoted",
                "quoted_label": a["label"],
                "quoted_source": a["source"],
            }
            rows.append({**base, "task": "", "metric": MEAN_METRIC, "value": a["value"]})
            rows += [{**base, "task": t, "metric": "accuracy", "value": v} for t, v in a["tasks"].items()]
    return rows
