"""Benchmark: the default grid's bf16 settings against fp32 on this machine's CPU.

Not a test. The default grid runs minilm's fine-tuning and evaluation under bf16 autocast (the suite's
``precision``) and its quantize forwards in bf16 (``forward_dtype`` / ``stats_dtype``): on a CPU with bf16
instructions (AVX-512 BF16 / AMX) that was 1.3-1.5x faster than fp32. A CPU without them (AVX2 only) emulates
bf16, and the same settings become many times slower. This script measures the ratio side by side in one
process on an all-MiniLM-L6-v2-shaped encoder (6 layers, width 384, random weights) with a batch of
``--batch`` x ``--tokens`` tokens:

* ``train``: forward + backward, as one fine-tuning step (without the optimizer);
* ``forward``: a no-grad forward, as evaluation and the quantize job's block forwards.

It prints a table and writes a CSV with the CPU's bf16 capability flags, so a user can see before
``make demo`` whether the bf16 settings of ``config.yaml`` pay on their machine (where they do not, set
``suites.minilm.options.precision: fp32`` and drop ``suites.minilm.quantize``: that changes the numbers).

    python bench/precision_bench.py                # one thread, ~1 min
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

from bench._table import text_table, write_csv  # noqa: E402
from epmq.models.bert import BertConfig, BertEncoderModel  # noqa: E402

COLUMNS = ["work", "fp32_ms", "bf16_ms", "bf16_vs_fp32", "cpu_bf16_flags", "cpu", "threads", "torch_version"]
#: /proc/cpuinfo flags that give a CPU native bf16 arithmetic
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return ",".join(f for f in BF16_FLAGS if f in flags) or "none"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(batch: int, tokens: int, repeats: int) -> list[dict]:
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    model = BertEncoderModel(cfg)
    ids = torch.randint(1000, 20000, (batch, tokens))
    mask = torch.ones_like(ids)

    def run(bf16: bool, train: bool):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
                out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if train:
                model.zero_grad(set_to_none=True)
                out.float().pow(2).mean().backward()
        return step

    rows = []
    for work, train in (("train", True), ("forward", False)):
        model.train(train)
        f32, b16 = _time(run(False, train), repeats), _time(run(True, train), repeats)
        rows.append({"work": work, "fp32_ms": 1e3 * f32, "bf16_ms": 1e3 * b16, "bf16_vs_fp32": b16 / f32,
                     "cpu_bf16_flags": cpu_flags(), "cpu": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads(), "torch_version": torch.__version__})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48, help="tokens per example (minilm's max_len)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/cpu-precision-<flags>.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args.batch, args.tokens, args.repeats)
    flags = rows[0]["cpu_bf16_flags"].replace(",", "-")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-precision-bf16flags-{flags}.csv"
    write_csv(rows, out, COLUMNS)
    cols = [("work", "{}"), ("fp32_ms", "{:.1f}"), ("bf16_ms", "{:.1f}"), ("bf16_vs_fp32", "{:.2f}x")]
    print(f"all-MiniLM-L6-v2-shaped encoder, {args.batch} x {args.tokens} tokens, ms (best of {args.repeats}) | "
          f"CPU bf16 flags: {rows[0]['cpu_bf16_flags']} | torch {torch.__version__} threads={rows[0]['threads']}")
    print("\n".join(text_table(rows, cols)))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
