"""The benchmarks' shared output: a right-aligned text table and a CSV with floats to 6 significant digits."""

from __future__ import annotations

import csv
from pathlib import Path

from epmq.io import atomic_path


def text_table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    """The lines of a table of ``rows``: one column per ``(key, format)`` in ``cols``, a rule under the header."""
    cells = [[c for c, _ in cols]] + [[fmt.format(r[c]) for c, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [" | ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
