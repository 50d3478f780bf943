"""Benchmark: the calibration statistics' Gram products with ``stats_dtype`` fp32 against bf16.

Not a test. For each layer-input width ``d_in``, accumulates ``G = Xa^T Xa`` and ``C = Xe_a^T Xa`` (what
:meth:`epmq.quant.target.TaskStats.add` does for one task of an E-PMQ layer) over ``--batches`` batches of
``--tokens`` random tokens, once with ``stats_dtype="fp32"`` and once with ``"bf16"``, side by side in one
process, and prints a table / writes a CSV:

* ``fp32_ms`` / ``bf16_ms``: milliseconds per batch (best of ``--repeats``), and their ratio;
* ``bf16_vs_rounded``: max |G_bf16 - G_exact| / max |G_exact|, where G_exact is the float64 product of the
  bf16-rounded inputs -- how far the fast path is from "fp32 sums of the rounded inputs" (~1e-7: the sums
  are not rounded to bf16);
* ``bf16_vs_fp32``: relative Frobenius difference of G between the two settings -- the input rounding itself.

Default widths: MiniLM (384, 1536), ViT-B/32 (768, 3072), ViT-L/14 (1024, 4096).

    python bench/grams_bench.py                    # CPU, one thread, ~1 min
    python bench/grams_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._table import text_table, write_csv as _write_csv  # noqa: E402
from epmq.quant.target import TaskStats  # noqa: E402

COLUMNS = ["d_in", "tokens", "fp32_ms", "bf16_ms", "speedup", "bf16_vs_rounded", "bf16_vs_fp32", "device",
           "device_name", "threads", "torch_version"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_add(d_in: int, xs, xes, stats_dtype: str, device, repeats: int) -> tuple[float, TaskStats]:
    best, stats = float("inf"), None
    for _ in range(repeats + 1):  # the first pass warms up (kernel selection, allocation)
        s = TaskStats(d_in, device=device, stats_dtype=stats_dtype)
        _sync(device)
        t0 = time.perf_counter()
        for x, xe in zip(xs, xes):
            s.add(x, xe)
        _sync(device)
        if stats is not None:
            best = min(best, (time.perf_counter() - t0) / len(xs))
        stats = s
    return best, stats


def bench(widths, tokens: int, batches: int, repeats: int, device: torch.device, seed: int = 0) -> list[dict]:
    rows = []
    for d in widths:
        g = torch.Generator().manual_seed(seed + d)
        xs = [torch.randn(tokens, d, generator=g).to(device) for _ in range(batches)]
        xes = [x + 0.1 * torch.randn(tokens, d, generator=g).to(device) for x in xs]
        t32, s32 = _time_add(d, xs, xes, "fp32", device, repeats)
        t16, s16 = _time_add(d, xs, xes, "bf16", device, repeats)
        xa = torch.cat([torch.cat(xs).to(torch.bfloat16).double(), torch.ones(tokens * batches, 1, device=device,
                                                                               dtype=torch.float64)], 1)
        exact = xa.T @ xa
        rows.append({
            "d_in": d, "tokens": tokens * batches, "fp32_ms": 1e3 * t32, "bf16_ms": 1e3 * t16, "speedup": t32 / t16,
            "bf16_vs_rounded": float((s16.G.double() - exact).abs().max() / exact.abs().max()),
            "bf16_vs_fp32": float((s16.G - s32.G).norm() / s32.G.norm()),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("d_in", "{}"), ("tokens", "{}"), ("fp32_ms", "{:.1f}"), ("bf16_ms", "{:.1f}"), ("speedup", "{:.2f}x"),
            ("bf16_vs_rounded", "{:.1e}"), ("bf16_vs_fp32", "{:.1e}")]
    m = rows[0]
    head = (f"G and C accumulated over `tokens` tokens, ms per batch (best of repeats) | "
            f"{m['device']}: {m['device_name']} | torch {m['torch_version']} threads={m['threads']}")
    return "\n".join([head, *text_table(rows, cols)])


def write_csv(rows: list[dict], path: Path) -> None:
    _write_csv(rows, path, COLUMNS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", default="384,768,1024,1536,3072,4096", help="comma-separated layer input widths")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/<device>-grams.csv)")
    args = p.parse_args(argv)
    args.d_in = [int(x) for x in args.d_in.split(",") if x.strip()]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = bench(args.d_in, args.tokens, args.batches, args.repeats, device)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{device.type}-grams.csv"
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
