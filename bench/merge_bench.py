"""Benchmark: peak host memory and time of the merge job, checkpoints loaded whole against streamed.

Not a test. Writes a base and T experts as random .safetensors files with the keys and shapes of the
``clip`` suite's open_clip vision tower (``--arch``, default ViT-L-14: width 1024, 24 blocks, MLP 4096,
patch 14 at 224 px = 257 tokens; 304 M parameters, 1.2 GB per file in float32), then runs the merge job once
per (method, mode), each in its own subprocess, and reads that process's peak RSS (``os.wait4``: the whole
process, imports included; sampled every 0.2 s, also its anonymous and file-backed parts) and times the job
call (``seconds``; ``process_seconds`` is the whole process):

``whole``   the job as it was before streaming: every checkpoint loaded with ``safetensors.torch.load_file``,
            each candidate merged into an in-memory state dict by the previous vectorised method code (a stack
            of every task vector), the best state dict kept beside the current one, the encoder filled with
            ``load_state_dict``, the best saved with ``save_file``. ``load_file`` maps each file copy-on-write,
            so most of this RSS is file pages: the kernel may evict them under pressure and read them again;
``stream``  :func:`epmq.pipeline.merge` itself: checkpoints read tensor by tensor, each candidate written to a
            temp file as it is merged and loaded key by key into the one encoder being evaluated.

Both run the job's selection over ``--lams`` (more than one value: each candidate goes into an encoder that
is "evaluated"; one value: no encoder). The stand-in suite's validation score is a statistic of the merged
weights (it costs nothing: the real job's evaluation time and memory are not part of this benchmark). Every
run's output file is hashed: ``same_bytes_as_whole`` says whether the streamed job wrote the previous job's
bytes. ``whole`` is skipped when it would need more memory than the machine has available.

    python bench/merge_bench.py --dir /big/disk/tmp                     # ViT-L/14, 20 experts, float32: ~26 GB
    python bench/merge_bench.py --dir /big/disk/tmp --dtype float16     # half the disk and memory
    python bench/merge_bench.py --blocks 2 --experts 4 --dir /tmp/mb    # a quick look
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._table import text_table, write_csv  # noqa: E402

MODES = ("whole", "stream")
METHODS = ("task_arithmetic", "ties")

CSV_COLUMNS = [
    "method", "mode", "seconds", "process_seconds", "peak_rss_mb", "peak_anon_mb", "peak_file_mb", "candidates",
    "chosen_lam", "same_bytes_as_whole", "sha256", "note", "arch", "blocks", "experts", "dtype", "checkpoint_mb",
    "largest_key", "largest_key_mb", "model_mb", "threads", "device_name", "mem_total_gb", "torch_version",
    "python_version",
]


# ------------------------------------------------------------------ the stand-in suite


def visual_config(args) -> dict:
    from epmq.models.sources import openclip_model_config

    cfg = copy.deepcopy(openclip_model_config(args.arch))
    if args.blocks:
        cfg["vision_cfg"]["layers"] = args.blocks
    if args.width:  # smoke tests only: not the architecture any more
        cfg["vision_cfg"]["width"] = args.width
    return cfg


def meta_encoder(args):
    """The open_clip vision tower on the meta device: its keys and shapes, no memory."""
    from epmq.models.sources import build_openclip_visual

    with torch.device("meta"):
        return build_openclip_visual(visual_config(args))


class BenchSuite:
    """What :func:`epmq.pipeline.merge` uses of a suite, over the files :func:`write_checkpoints` made."""

    name = "merge-bench"
    merge_exclude = None  # the default exclusions, as the clip suite

    def __init__(self, folder: Path, args):
        self.folder, self.args = Path(folder), args
        self.tasks = tuple(f"task{t:02d}" for t in range(args.experts))
        self.base_path = self.folder / "base.safetensors"

    def expert_path(self, task: str) -> Path:
        return self.folder / f"{task}.safetensors"

    def new_encoder(self):
        """The tower, allocated but not initialised (its weights are loaded next), in float32."""
        return meta_encoder(self.args).to_empty(device="cpu").float()

    def evaluate_all(self, encoder, *, split: str = "test") -> dict:
        """A deterministic stand-in score per task: statistics of the merged weights, no data."""
        w = encoder.ln_post.weight.detach().double()
        return {"tasks": {t: {"accuracy": float(w[i % w.numel()] - w.mean())} for i, t in enumerate(self.tasks)}}


# ------------------------------------------------------------------ the job before streaming


def previous_task_arithmetic(base, experts, *, lam=0.3, dare_p=0.0, seed=0):
    """Task arithmetic as it was computed before the streamed form: a list of every task vector, then a sum."""
    from epmq.merge.base import mix_seed
    from epmq.merge.dare import dare

    taus = [dare(e.float() - base.float(), dare_p, mix_seed(seed, t)) for t, e in enumerate(experts)]
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return base.float() + lam * total


def previous_ties(base, experts, *, k=20.0, lam=0.3, merge_func="sum", trim_scope="global", thresholds=None,
                  dare_p=0.0, seed=0):
    """TIES as it was computed before the streamed form: vectorised over a stack of every task vector."""
    from epmq.merge.base import mix_seed
    from epmq.merge.dare import dare
    from epmq.merge.ties import trim_rank

    taus = torch.stack([dare(e.float() - base.float(), dare_p, mix_seed(seed, t)) for t, e in enumerate(experts)])
    taus = taus.reshape(len(experts), -1)
    magnitude = taus.abs()
    if trim_scope == "tensor":
        rank = trim_rank(taus.shape[1], k)
        cut = magnitude.kthvalue(rank, dim=1, keepdim=True).values if rank else torch.zeros_like(magnitude[:, :1])
    else:
        cut = torch.tensor(thresholds, dtype=torch.float32).reshape(-1, 1)
    trimmed = taus * (magnitude >= cut)
    elected = torch.sign(trimmed.sum(dim=0))
    elected[elected == 0] = 1.0 if elected.sum() >= 0 else -1.0
    agree = torch.where(elected > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(dim=0)
    if merge_func == "mean":
        merged /= agree.sum(dim=0).clamp(min=1)
    return base.float() + lam * merged.reshape(base.shape)


def previous_method(name: str):
    import dataclasses

    from epmq.merge import METHODS

    fn = {"task_arithmetic": previous_task_arithmetic, "ties": previous_ties}[name]
    return dataclasses.replace(METHODS[name], fn=fn)


def whole_job(suite: BenchSuite, method: str, params: dict, select: dict, out: Path) -> dict:
    """The merge job before streaming (its loop, written out again): every checkpoint in memory."""
    from safetensors.torch import load_file

    from epmq.io import save_safetensors_atomic
    from epmq.merge import merge_state_dicts
    from epmq.pipeline import merge_candidates

    base = load_file(str(suite.base_path))
    experts = [load_file(str(suite.expert_path(t))) for t in suite.tasks]
    spec = previous_method(method)
    trials, best = [], None
    candidates = merge_candidates(select)
    for cand in candidates:
        sd = merge_state_dicts(base, experts, spec, **{**params, **cand})
        trial = {"params": cand}
        if len(candidates) > 1:
            enc = suite.new_encoder()
            enc.load_state_dict(sd, strict=False)
            recs = suite.evaluate_all(enc.eval(), split="validation")["tasks"]
            del enc
            trial["validation_mean"] = sum(r["accuracy"] for r in recs.values()) / len(recs)
        trials.append(trial)
        if best is None or trial.get("validation_mean", 0) > best[0].get("validation_mean", 0):
            best = (trial, sd)
    chosen = {**params, **best[0]["params"]}
    save_safetensors_atomic(out, best[1], metadata={"epmq_merge": json.dumps(chosen)})
    return {"params": chosen, "trials": trials}


def child(args) -> None:
    """One (method, mode) run, in its own process; its peak RSS is read by the parent."""
    from epmq import pipeline
    from epmq.io import write_text_atomic

    if args.child == "whole":  # if memory runs out after all, the out-of-memory killer takes this process first
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass
    torch.set_num_threads(args.threads)
    suite = BenchSuite(args.dir, args)
    params = {"k": 20} if args.method == "ties" else {}
    select = {"lam": args.lams} if len(args.lams) > 1 else {}
    if not select:
        params["lam"] = args.lams[0]
    out = Path(args.out_file)
    meta_encoder(args)  # imports what building on the meta device needs, outside the timing
    t0 = time.perf_counter()
    if args.child == "whole":
        record = whole_job(suite, args.method, params, select, out)
    else:
        pipeline.open_suite = lambda spec: suite  # the job, with the stand-in suite
        record = pipeline.merge({}, args.method, args.method, params, select, out)
    seconds = time.perf_counter() - t0
    write_text_atomic(args.json_out, json.dumps({"chosen_lam": record["params"]["lam"], "seconds": seconds}))


# ------------------------------------------------------------------ checkpoints


def layout(args) -> dict:
    """Every key of the tower with its (dtype, shape), in ``--dtype``."""
    dtype = getattr(torch, args.dtype)
    return {k: (dtype, tuple(v.shape)) for k, v in meta_encoder(args).state_dict().items()}


def write_checkpoints(args, folder: Path) -> None:
    """The base (N(0, 0.02²) weights, ones for LayerNorm scales) and T experts (base + N(0, 0.01²)), written
    key by key to all T + 1 files at once: one key's tensors in memory. Reused when their settings match."""
    from epmq.io import SafetensorsStream
    from epmq.merge import lazy_state_dict

    stamp = json.dumps({k: getattr(args, k) for k in ("arch", "blocks", "width", "experts", "dtype", "seed")})
    suite = BenchSuite(folder, args)
    paths = [suite.base_path] + [suite.expert_path(t) for t in suite.tasks]
    if all(p.is_file() and lazy_state_dict(p).metadata().get("bench") == stamp for p in paths):
        return
    lay = layout(args)
    gen = torch.Generator().manual_seed(args.seed)
    writers = [SafetensorsStream(p, lay, {"bench": stamp}) for p in paths]
    try:
        for key in writers[0].order:
            _, shape = lay[key]
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=gen).mul_(0.02)
            writers[0].write(key, base.to(lay[key][0]))
            for w in writers[1:]:
                w.write(key, torch.randn(shape, generator=gen).mul_(0.01).add_(base).to(lay[key][0]))
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.discard()
        raise


# ------------------------------------------------------------------ parent: runs, table, CSV


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def run_child(args, mode: str, method: str, folder: Path) -> dict:
    """Run one (method, mode) in a subprocess; its wall time, peak RSS (wait4) and output file."""
    out = folder / "out" / f"{method}-{mode}.safetensors"
    js = folder / "out" / f"{method}-{mode}.result.json"
    out.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--method", method,
           "--out-file", str(out), "--json-out", str(js), *_argv_for(args, folder)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    sampled = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()
    watcher = threading.Thread(target=_sample_rss, args=(proc.pid, sampled, done), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_seconds = time.perf_counter() - t0
    peak_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    split = {"peak_anon_mb": sampled["RssAnon"] / 1024, "peak_file_mb": sampled["RssFile"] / 1024}
    if proc.returncode != 0:
        return {"seconds": float("nan"), "process_seconds": process_seconds, "peak_rss_mb": peak_mb, **split,
                "note": f"failed (exit {proc.returncode})", "sha256": "", "chosen_lam": float("nan")}
    res = json.loads(js.read_text())
    digest = sha256(out)
    for p in (out, out.with_suffix(".json"), js):
        p.unlink(missing_ok=True)
    return {"process_seconds": process_seconds, "peak_rss_mb": peak_mb, **split, "note": "", "sha256": digest,
            **res}


def _sample_rss(pid: int, peaks: dict, done: threading.Event) -> None:
    """Track the highest anonymous and file-backed resident sizes (kB) of process ``pid``, every 0.2 s: the
    kernel keeps only the total's high-water mark, and checkpoints mapped by ``load_file`` are file pages."""
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.2):
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError, IndexError):
            continue


def _argv_for(args, folder: Path) -> list[str]:
    argv = ["--arch", args.arch, "--blocks", str(args.blocks), "--width", str(args.width), "--experts",
            str(args.experts), "--dtype", args.dtype, "--lams", ",".join(map(str, args.lams)), "--threads",
            str(args.threads), "--seed", str(args.seed), "--dir", str(folder)]
    return argv


def bench(args) -> list[dict]:
    lay = layout(args)
    itemsize = getattr(torch, args.dtype).itemsize
    numel = {k: math.prod(s) for k, (_, s) in lay.items()}
    ckpt_bytes = sum(numel.values()) * itemsize
    model_bytes = sum(numel.values()) * 4  # the encoder is float32
    largest = max(numel, key=numel.get)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    need_disk = (args.experts + 3) * ckpt_bytes
    free = shutil.disk_usage(folder).free
    if free < need_disk:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the checkpoints and outputs need "
                         f"{need_disk / 1e9:.1f} GB (use --dir elsewhere, --dtype float16 or --blocks)")
    t0 = time.perf_counter()
    write_checkpoints(args, folder)
    print(f"{args.experts} experts + base in {folder} ({time.perf_counter() - t0:.0f} s, "
          f"{ckpt_bytes / 2**20:.0f} MB each)", file=sys.stderr)
    meta = {"arch": args.arch, "blocks": args.blocks or len(meta_encoder(args).transformer.resblocks),
            "experts": args.experts, "dtype": args.dtype, "checkpoint_mb": ckpt_bytes / 2**20,
            "largest_key": f"{largest} {tuple(lay[largest][1])}", "largest_key_mb": numel[largest] * itemsize / 2**20,
            "model_mb": model_bytes / 2**20, "threads": args.threads, "device_name": device_name(),
            "mem_total_gb": mem_total_bytes() / 2**30, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "candidates": len(args.lams)}
    rows = []
    try:
        for method in args.methods:
            whole_sha = None
            for mode in args.modes:
                row = {"method": method, "mode": mode, **meta}
                # whole: T + 1 checkpoints, up to three merged state dicts (best, previous, current), the encoder
                need = (args.experts + 1) * ckpt_bytes + 3 * ckpt_bytes + model_bytes + 2**30
                if mode == "whole" and need > mem_available_bytes():
                    row.update(seconds=float("nan"), process_seconds=float("nan"), peak_rss_mb=float("nan"),
                               peak_anon_mb=float("nan"), peak_file_mb=float("nan"), sha256="", chosen_lam=float("nan"),
                               note=f"skipped: needs ~{need / 2**30:.0f} GiB, "
                                    f"{mem_available_bytes() / 2**30:.0f} GiB available")
                else:
                    print(f"{method} {mode} ...", file=sys.stderr)
                    row.update(run_child(args, mode, method, folder))
                if mode == "whole":
                    whole_sha = row["sha256"] or None
                row["same_bytes_as_whole"] = ("-" if mode == "whole" or whole_sha is None or not row["sha256"]
                                              else str(row["sha256"] == whole_sha).lower())
                rows.append(row)
                print("  " + format_table([row]).splitlines()[-1], file=sys.stderr)
    finally:
        if not args.keep:
            if args.dir:
                for p in [*folder.glob("*.safetensors"), *folder.glob("out/*"), *folder.glob(".*.tmp")]:
                    p.unlink(missing_ok=True)
                for d in (folder / "out", folder):
                    try:
                        d.rmdir()
                    except OSError:
                        pass
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return rows


def format_table(rows: list[dict]) -> str:
    m = rows[0]
    head = (f"{m['arch']} blocks={m['blocks']} T={m['experts']} {m['dtype']} ({m['checkpoint_mb']:.0f} MB a file, "
            f"encoder {m['model_mb']:.0f} MB float32, largest key {m['largest_key']} {m['largest_key_mb']:.1f} MB) "
            f"| {m['candidates']} candidate(s) | {m['device_name']}, {m['mem_total_gb']:.0f} GiB | "
            f"torch {m['torch_version']} threads={m['threads']}")
    cols = [("method", "{}"), ("mode", "{}"), ("seconds", "{:.1f}"), ("process_seconds", "{:.1f}"),
            ("peak_rss_mb", "{:.0f}"), ("peak_anon_mb", "{:.0f}"), ("peak_file_mb", "{:.0f}"),
            ("chosen_lam", "{}"), ("same_bytes_as_whole", "{}"), ("note", "{}")]
    return "\n".join([head, *text_table(rows, cols)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-L-14", help="open_clip architecture (the clip suite's open_clip layout)")
    p.add_argument("--blocks", type=int, default=0, help="resblocks (0: the architecture's)")
    p.add_argument("--width", type=int, default=0, help="override the width (smoke tests only; 0: the arch's)")
    p.add_argument("--experts", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--lams", default="0.3,1.0", help="the λ candidates the job selects from (one: no selection)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="folder for the checkpoints (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by a later run)")
    p.add_argument("--out", default=None, help="CSV (default bench/results/cpu-merge-<arch>-T<n>-<dtype>.csv)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--out-file", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lams = [float(x) for x in args.lams.split(",") if x.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.lams:
        p.error("--lams: at least one value")
    if any(m not in METHODS for m in args.methods) or any(m not in MODES for m in args.modes):
        p.error(f"--methods / --modes: expected subsets of {','.join(METHODS)} / {','.join(MODES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    rows = bench(args)
    blocks = f"-{args.blocks}blocks" if args.blocks else ""
    out = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"cpu-merge-{args.arch}{blocks}-T{args.experts}-{args.dtype}.csv")
    write_csv(rows, out, CSV_COLUMNS)
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
