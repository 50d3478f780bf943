"""Library demo: merge synthetic experts of a tiny open_clip ViT, quantize the merge with every method.

This exercises the whole numeric core offline in about a minute: task-arithmetic merge, RTN / GPTQ /
E-PMQ and the METHOD.md section 5 ablations at 2, 3 and 4 bits through the layer-wise engine, and a packed
3-bit checkpoint. Its metric is the mean squared distance of the quantized model's outputs to each
expert's outputs on held-out inputs of that expert's task (lower is better). The experts are random
perturbations of a random model, so this is **not** an accuracy benchmark: it shows what the methods do
to the layer-wise objective, nothing about task performance.

    python -m epmq.demo --out reports/demo
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

from epmq.io import atomic_path, write_text_atomic

METHOD_ORDER = ("rtn", "gptq", "gptq_epmq_hessian", "gptq_corrected", "epmq", "epmq_unrounded")


def _tasks(n_tasks, n_batches, bs, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    means = [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1000 + t)) for t in range(n_tasks)]
    return [[torch.randn(bs, 3, 28, 28, generator=g) * (0.5 + 0.5 * t) + means[t] for _ in range(n_batches)]
            for t in range(n_tasks)]


def _distance(model, experts, tasks) -> float:
    import torch

    with torch.no_grad():
        per = [sum(float(((model(b) - e(b)) ** 2).mean()) for b in bs) / len(bs) for e, bs in zip(experts, tasks)]
    return sum(per) / len(per)


def run(out: Path, *, n_tasks=4, bits=(2, 3, 4), seed=0, progress=True) -> list[dict]:
    import torch

    from epmq.engine import QuantConfig, quantize_model
    from epmq.merge import merge_state_dicts
    from epmq.models.openclip import tiny_vision_transformer
    from epmq.quant.packed import save_quantized

    torch.manual_seed(seed)
    base = tiny_vision_transformer(width=64, layers=3, heads=4, output_dim=32).eval()
    experts = []
    for t in range(n_tasks):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed + 10 + t)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.3 * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
        experts.append(e)
    merged = copy.deepcopy(base)
    merged.load_state_dict(
        merge_state_dicts(base.state_dict(), [e.state_dict() for e in experts], "task_arithmetic", lam=0.3)
    )
    calib, held_out = _tasks(n_tasks, 4, 16, seed + 1), _tasks(n_tasks, 4, 16, seed + 2)
    rows = [
        {"model": "merged (FP)", "bits": 32, "distance_to_experts": _distance(merged, experts, held_out), "seconds": 0.0}
    ]
    for b in bits:
        for method in METHOD_ORDER:
            if method == "epmq_unrounded" and b != bits[0]:
                continue
            model = copy.deepcopy(merged)
            t0 = time.perf_counter()
            report = quantize_model(model, calib, QuantConfig(method=method, bits=b), experts=experts, progress=progress)
            rows.append({
                "model": method,
                "bits": 32 if method == "epmq_unrounded" else b,
                "distance_to_experts": _distance(model, experts, held_out),
                "seconds": time.perf_counter() - t0,
            })
            if method == "epmq" and b == 3:
                sizes = save_quantized(model, report.results, out / "epmq-3bit", config={"method": "epmq", "bits": 3})
                rows[-1]["checkpoint"] = str(sizes)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "demo.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "bits", "distance_to_experts", "seconds"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "distance_to_experts": f"{r['distance_to_experts']:.6g}", "seconds": f"{r['seconds']:.2f}"})
    lines = [
        "# epmq library demo (synthetic experts: output distance, not accuracy)",
        "",
        "Tiny open_clip ViT (3 blocks, width 64), 4 random-perturbation experts, task-arithmetic merge (λ=0.3),",
        "64 calibration images per task, 64 held-out images per task. Metric: mean squared distance of the",
        "model's outputs to each expert's outputs on that expert's held-out inputs (lower is better).",
        "",
        "| model | bits | distance to experts | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits']} | {r['distance_to_experts']:.4g} | {r['seconds']:.1f} |")
    write_text_atomic(out / "demo.md", "\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = run(args.out, seed=args.seed)
    write(rows, args.out)
    print((args.out / "demo.md").read_text())


if __name__ == "__main__":
    main()
