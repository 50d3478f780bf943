"""Display names, fixed orders and canonical strings shared by the tables, the CSV and the figures."""

from __future__ import annotations

import re

from epmq.formatting import compact_json  # noqa: F401 (re-exported: render, runs)
from epmq.formatting import display_value as fmt_value  # the report form (see epmq.formatting)
from epmq.merge.registry import METHODS as _MERGES

MODEL_ORDER = {"base": 0, "expert": 1, "merged": 2, "quantized": 3}

#: Display names of the quantization methods (unknown names are shown as they are).
METHOD_NAMES = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "epmq": "E-PMQ",
    "epmq_unrounded": "E-PMQ target, unrounded",
    "gptq_corrected": "GPTQ on E-PMQ-corrected model",
    "gptq_epmq_hessian": "GPTQ, E-PMQ Hessian, merged target",
}
#: The three headline methods, in table order, then the ablations of METHOD.md section 5, in table order.
MAIN_METHODS = ("rtn", "gptq", "epmq")
ABLATION_METHODS = ("epmq_unrounded", "gptq_corrected", "gptq_epmq_hessian")
#: Not a quantized model (no rounding): never ranked as "best quantized".
UNRANKED_METHODS = frozenset({"epmq_unrounded"})

#: Display names of the merge methods (unknown names are shown as they are).
MERGE_NAMES = {name: m.label for name, m in _MERGES.items()}

#: Merge hyperparameters with a conventional symbol.
_PARAM_SYMBOLS = {"lam": "λ"}

MINUS = "\u2212"  # typographic minus for signed differences
DASH = "\u2013"  # the "no data" mark


def method_name(method: str | None) -> str:
    return DASH if method is None else METHOD_NAMES.get(method, method)


def merge_name(merge: str | None) -> str:
    return DASH if merge is None else MERGE_NAMES.get(merge, merge)


def method_rank(method: str) -> tuple:
    """Table order: RTN, GPTQ, E-PMQ, the ablations in their listed order, then unknown methods by name."""
    order = MAIN_METHODS + ABLATION_METHODS
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
