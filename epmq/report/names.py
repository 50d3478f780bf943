"""Display names, fixed orders and canonical strings shared by the tables, the CSV and the figures.

A quantization method's label, table order, colour, whether it is ranked and which methods are the Δ baseline
and the headline all come from the quantizer registry (:data:`epmq.quant.METHODS`), read at call time: a
quantizer added there is shown without a change here."""

from __future__ import annotations

import re

from epmq.formatting import compact_json  # noqa: F401 (re-exported: render, runs)
from epmq.formatting import display_value as fmt_value  # the report form (see epmq.formatting)
from epmq.merge.registry import METHODS as _MERGES

MODEL_ORDER = {"base": 0, "expert": 1, "merged": 2, "quantized": 3}


def _registry() -> dict:
    from epmq.quant.methods import METHODS

    return METHODS


def quantizers() -> list:
    """The registered quantizers in table order."""
    return sorted(_registry().values(), key=lambda q: q.order)


def method_names() -> dict:
    """Display names of the quantization methods (unknown names are shown as they are)."""
    return {q.name: q.display for q in quantizers()}


def main_methods() -> tuple:
    """The headline methods (not ablations), in table order: every bit-width block shows them."""
    return tuple(q.name for q in quantizers() if not q.ablation)


def ablation_methods() -> tuple:
    """The ablations of METHOD.md section 5, in table order: shown where they were run."""
    return tuple(q.name for q in quantizers() if q.ablation)


def unranked_methods() -> frozenset:
    """Methods whose rows are not quantized models: never ranked as "best quantized"."""
    return frozenset(q.name for q in quantizers() if not q.ranked)


def _flagged(flag: str) -> str | None:
    return next((q.name for q in quantizers() if getattr(q, flag)), None)


def baseline_method() -> str | None:
    """The reference of every Δ column (GPTQ), None when no quantizer is marked ``baseline``."""
    return _flagged("baseline")


def headline_method() -> str | None:
    """The method whose Δ against the baseline the pivot table shows (E-PMQ)."""
    return _flagged("headline")


def method_colour(method: str) -> str | None:
    """A registered method's figure colour (None: unknown or none given)."""
    q = _registry().get(method)
    return q.colour if q is not None and q.colour else None


_COMPAT = {  # the constants of earlier versions, now read from the registry when asked for
    "METHOD_NAMES": method_names,
    "MAIN_METHODS": main_methods,
    "ABLATION_METHODS": ablation_methods,
    "UNRANKED_METHODS": unranked_methods,
}


def __getattr__(name):
    if name in _COMPAT:
        return _COMPAT[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Display names of the merge methods (unknown names are shown as they are).
MERGE_NAMES = {name: m.label for name, m in _MERGES.items()}

#: Merge hyperparameters with a conventional symbol.
_PARAM_SYMBOLS = {"lam": "λ"}

MINUS = "\u2212"  # typographic minus for signed differences
DASH = "\u2013"  # the "no data" mark


def method_name(method: str | None) -> str:
    if method is None:
        return DASH
    q = _registry().get(method)
    return method if q is None else q.display


def merge_name(merge: str | None) -> str:
    return DASH if merge is None else MERGE_NAMES.get(merge, merge)


def method_rank(method: str) -> tuple:
    """Table order: the registered quantizers by their ``order`` (RTN, GPTQ, E-PMQ, the ablations), then
    unknown methods by name."""
    order = [q.name for q in quantizers()]
    return (order.index(method), "") if method in order else (len(order), method)


def variant_str(variant: dict | None) -> str:
    """The canonical sweep-point label: ``{"lam_w": 0.1, "alpha": 1}`` -> ``"alpha=1,lam_w=0.1"``; {} -> ``""``."""
    return ",".join(f"{k}={fmt_value(v)}" for k, v in sorted((variant or {}).items()))


def params_label(params: dict | None) -> str:
    """Merge hyperparameters for display: λ first, then the others by name (``λ=0.3, k=20``)."""
    items = sorted((params or {}).items(), key=lambda kv: (kv[0] not in _PARAM_SYMBOLS, kv[0]))
    return ", ".join(f"{_PARAM_SYMBOLS.get(k, k)}={fmt_value(v)}" for k, v in items)


def merge_label(merge: str, params: dict | None, *, with_params: bool) -> str:
    label = merge_name(merge)
    p = params_label(params) if with_params else ""
    return f"{label} ({p})" if p else label


def bits_label(bits: int | None, group_size: int | None) -> str:
    """``4`` (one scale per output row), ``4 · g64`` (group size 64), ``FP`` (no bit width)."""
    if bits is None:
        return "FP"
    return str(bits) if group_size in (None, -1, 0) else f"{bits} · g{group_size}"


def none_first(x) -> tuple:
    """Sort key that puts None before every value (mixed None/int/str columns sort without TypeError)."""
    return (x is not None, x if x is not None else 0)


def group_size_key(gs: int | None) -> tuple:
    """Per-row scales (-1 or None) before grouped ones, grouped ones by size."""
    return (0, 0) if gs in (None, -1, 0) else (1, gs)


def safe_name(name: str) -> str:
    """A suite name made safe for a file name (``minilm/v2`` -> ``minilm_v2``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "suite"
