"""Bytes on disk and CPU forward latency of exported folders (``epmq.export``), per format and bit width.

A transformers ``CLIPVisionModel`` of ViT-B/32's shape (width 768, 12 layers, 224 px; random weights: sizes do
not depend on values) is quantized with RTN (per-channel by default, ``--group-size``) at each bit width, then
exported as ``gptq`` (2/3/4/8 bits), ``compressed-tensors`` and ``epmq``. Reported per row: ``model.safetensors``
bytes, the whole folder's bytes, MB, the ratio to the float32 / fp16 checkpoint, and the latency (median of
``--repeats``, batch ``--batch``, 1 thread by default) of a forward through the loaded model:

* ``fp32``: the unquantized model;
* ``compressed-tensors``: loaded by ``transformers`` + ``compressed-tensors`` (symmetric grid: see
  tests/test_export.py), decompressed to dense weights at load, so it runs at dense speed;
* ``epmq``: ``epmq.quant.packed.load_quantized`` (``QuantLinear`` dequantizes every weight on each forward);
* ``gptq``: no CPU GPTQ loader installs beside our torch (sizes only).

    .venv/bin/python bench/export_bench.py [--layers 12] [--bits 2,3,4,8] [--out bench/results/cpu-export.csv]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import text_table, write_csv  # noqa: E402

from epmq.export import export_model, folder_bytes  # noqa: E402
from epmq.quant.rounding import rtn  # noqa: E402


def build(layers: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=12,
                           image_size=224, patch_size=32)
    return CLIPVisionModel(cfg).eval()


def latency(model, x, repeats: int) -> float:
    with torch.no_grad():
        model(pixel_values=x)  # warm-up (and compressed-tensors' decompress-on-first-forward)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(pixel_values=x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu-export.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import CLIPVisionModel

    from epmq.quant.packed import load_quantized

    model = build(args.layers)
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from safetensors.torch import save_file

        from epmq.export import hf_config

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "fp32.safetensors"))
        fp32 = (tmp / "fp32.safetensors").stat().st_size
        fp16 = sum(v.numel() * 2 for v in model.state_dict().values())
        fp_ms = latency(model, x, args.repeats)
        rows.append({"format": "fp32", "bits": 32, "group_size": -1, "weights_bytes": fp32, "folder_bytes": fp32,
                     "packed_mb": fp32 / 2**20, "vs_fp32": 1.0, "vs_fp16": fp32 / fp16, "latency_ms": fp_ms,
                     "latency_vs_fp32": 1.0, "loader": "torch"})
        del hf_config
        for bits in [int(b) for b in args.bits.split(",")]:
            for fmt in ("gptq", "compressed-tensors", "epmq"):
                if fmt == "gptq" and bits not in (2, 3, 4, 8):
                    continue
                sym = fmt != "epmq"  # gptq v1 / transformers' compressed-tensors loader: a symmetric grid
                res = {f"{n}.weight": rtn(m.weight, bits, group_size=args.group_size, sym=sym)
                       for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                out = tmp / f"{fmt}-{bits}"
                rec = export_model(model, res, out, fmt=fmt)
                row = {"format": fmt, "bits": bits, "group_size": args.group_size,
                       "weights_bytes": rec["weights_bytes"], "folder_bytes": folder_bytes(out),
                       "packed_mb": rec["weights_bytes"] / 2**20, "vs_fp32": rec["weights_bytes"] / fp32,
                       "vs_fp16": rec["weights_bytes"] / fp16, "latency_ms": float("nan"),
                       "latency_vs_fp32": float("nan"), "loader": "-"}
                if fmt == "compressed-tensors":
                    import logging

                    logging.disable(logging.WARNING)
                    loaded = CLIPVisionModel.from_pretrained(str(out), local_files_only=True).eval()
                    row["loader"] = "transformers+compressed-tensors (dense after load)"
                elif fmt == "epmq":
                    loaded = load_quantized(build(args.layers), out)
                    row["loader"] = "epmq load_quantized (dequantize per forward)"
                else:
                    loaded = None
                if loaded is not None:
                    row["latency_ms"] = latency(loaded, x, args.repeats)
                    row["latency_vs_fp32"] = row["latency_ms"] / fp_ms
                rows.append(row)
                print(f"{fmt} {bits}-bit: {row['packed_mb']:.1f} MB, {row['latency_ms']:.0f} ms", flush=True)
    cols = [("format", "{}"), ("bits", "{}"), ("weights_bytes", "{}"), ("packed_mb", "{:.1f}"), ("vs_fp32", "{:.3f}"),
            ("vs_fp16", "{:.3f}"), ("latency_ms", "{:.0f}"), ("latency_vs_fp32", "{:.2f}"), ("loader", "{}")]
    print(f"CLIPVisionModel ViT-B/32 shape, {args.layers} layers, group {args.group_size}, batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("\n".join(text_table(rows, cols)))
    write_csv(rows, Path(args.out), list(rows[0]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
