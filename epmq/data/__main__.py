"""``python -m epmq.data fetch-all | fetch NAME... | list``: install, verify and summarise the data sets."""

from __future__ import annotations

import argparse
import sys
import time

from epmq.data import DATASETS, load_dataset
from epmq.data.install import data_dir
from epmq.errors import EPMQError


def _fetch(names: list[str], seed: int) -> int:
    rows, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            ds = load_dataset(name, seed=seed)
        except EPMQError as e:
            failed.append(name)
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            continue
        dt = time.perf_counter() - t0
        n_cls = ds["train"].features["label"].num_classes
        rows.append((name, len(ds["train"]), len(ds["validation"]), len(ds["test"]), n_cls, f"{dt:.1f}"))
    head = ("name", "n_train", "n_val", "n_test", "n_classes", "seconds")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(f"data folder: {data_dir()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epmq.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    fa = sub.add_parser("fetch-all", help="install and verify every data set, then print a size table")
    fa.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("fetch", help="install and verify the named data sets")
    f.add_argument("names", nargs="+", choices=sorted(DATASETS))
    f.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="list the data set names")
    a = p.parse_args(argv)
    if a.cmd == "list":
        print("\n".join(DATASETS))
        return 0
    return _fetch(list(DATASETS) if a.cmd == "fetch-all" else a.names, a.seed)


if __name__ == "__main__":
    sys.exit(main())
