"""How a scalar setting is written as text -- two forms, on purpose, both owned here.

* :func:`id_value` -- the form inside result *paths* (quantizer ids such as ``epmq.lam_w=0.1``; written as
  ``epmq.identity.fmt_value`` there, and read back by ``epmq.identity.parse_value``). Existing
  results folders are named with it, so it must never change: floats as their shortest round-trip
  ``repr`` (``0.1``, ``1e-05``, ``0.0``, ``1000000.0``, ``1e+20``) except integral ones with
  1 <= |v| < 1e6, written without the ``.0`` (``2.0`` -> ``2``); bools lowercase; anything else ``str()``
  (``None`` -> ``None``, strings as they are).
* :func:`display_value` -- the form the *report* shows and sorts by (sweep labels, merge hyperparameters):
  strings as they are, integral floats below 1e15 as integers (``0.0`` -> ``0``, ``1e6`` -> ``1000000``),
  other scalars as JSON (``None`` -> ``null``, ``nan`` -> ``NaN``), containers as compact key-sorted JSON.

They agree on the values a sweep usually holds (``0.1``, ``1e-05``, ``2``, ``true``) and differ on others
(``0.0``, ``1e6``, ``None``, NaN, lists), which is why they are two functions: a report label is free to
improve, a path component is not.
"""

from __future__ import annotations

import json


def id_value(v) -> str:
    """A sweep value as it appears in a quantizer id (a path component): shortest round-trip text
    (0.1, 1e-05, 2)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v)) if abs(v) >= 1 else repr(v)
    return repr(v) if isinstance(v, float) else str(v)


def display_value(v) -> str:
    """A scalar as a short canonical string for the report: 0.1 -> "0.1", 1e-5 -> "1e-05", True -> "true"."""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, (bool, int, float)) or v is None:
        return json.dumps(v)
    return compact_json(v)


def compact_json(obj) -> str:
    """Canonical compact JSON (sorted keys, no spaces): stable across runs and Python versions."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
