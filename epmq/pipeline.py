"""Every workflow stage as one function over files: what the Snakemake scripts and the ``epmq`` CLI call.

Stages and their artefacts (``R`` = the config's ``results`` folder, ``S`` = a suite id)::

    build base      R/S/base.safetensors                       (+ heads R/S/heads/<task>.*)
    build expert    R/S/experts/<task>.safetensors
    merge           R/S/merged/<merge>.safetensors    + .json  (hyperparameters chosen on validation)
    calibrate       R/S/calib/n<n>_s<seed>.safetensors         (the calibration batches of every task)
    quantize        R/S/quant/<run>.safetensors       + .json  (fake-quant weights; <run> see epmq.identity)
    evaluate        R/S/eval/<model>.json                      (per-task test accuracy, one run record)
    report          reports/leaderboard.{csv,md,html}, reports/figures/*.svg

The paths are rendered and parsed by :mod:`epmq.identity` (a model's id, its files, the rules' patterns); a
quantize job is described by a :class:`~epmq.identity.QuantRun`, the files it reads and writes
(:class:`QuantizeFiles`) and how it runs (:class:`QuantizeOptions`).

Every file is written atomically (temp file + rename), so an interrupted job leaves nothing a later job could
mistake for a result. Suite ``spec`` dicts (``{"type", "cache", "seed", "options", "threads"}``) come from
:func:`suite_spec`; they travel through Snakemake's ``params:`` so that changing a suite option re-runs the
jobs that depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from epmq.errors import EPMQError, all_finite
from epmq.identity import Base, Calib, Expert, Merged, Model, QuantRun, render
from epmq.io import load_safetensors as _load_sd
from epmq.io import save_safetensors_atomic, write_json_atomic
from epmq.io import stderr_isatty as _isatty

# ---------------------------------------------------------------------------------------------- paths

#: every stage's artefact as a pattern (``{results}`` and the rules' wildcards), rendered by epmq.identity
PATTERNS = {
    "base": Base.pattern("{results}"),  # {results}/{suite}/base.safetensors
    "expert": Expert.pattern("{results}"),  # {results}/{suite}/experts/{task}.safetensors
    "merged": Merged.pattern("{results}"),  # {results}/{suite}/merged/{merge}.safetensors
    "calib": Calib.pattern("{results}"),  # {results}/{suite}/calib/n{n}_s{seed}.safetensors
    "quant": QuantRun.pattern("{results}"),  # {results}/{suite}/quant/{merge}/{quantizer}/w{bits}g{group}/s{seed}...
    "eval": render("{results}", "{suite}", "{model}", ".json", folder="eval"),  # {results}/{suite}/eval/{model}.json
}


def suite_spec(grid, suite: str) -> dict:
    """What a job needs to re-open suite ``suite`` of a :class:`epmq.config.Grid` (its thread count is the
    job's own: set ``spec["threads"]``, it is not part of what the artefacts depend on)."""
    s = grid.suites[suite]
    return {"type": s["type"], "cache": f"{grid.config['results']}/{suite}", "seed": s["seed"],
            "options": s["options"]}


def with_threads(spec: dict, threads: int) -> dict:
    return {**spec, "threads": int(threads)}


def open_suite(spec: dict):
    import torch

    from epmq.suites import get_suite

    threads = int(spec.get("threads") or 1)
    torch.set_num_threads(threads)
    return get_suite(spec["type"], spec["cache"], seed=spec["seed"], threads=threads, **spec["options"])


def peak_memory_line() -> str:
    """``peak host RSS N MB`` (this process's high-water mark), plus the peak GPU memory of every CUDA
    device this process allocated on (torch's allocator), for the end of a job's log."""
    import resource

    parts = [f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"]
    torch = sys.modules.get("torch")  # a job that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            peak = torch.cuda.max_memory_allocated(i)
            if peak:
                parts.append(f"peak GPU memory {peak / 2**20:.0f} MB on cuda:{i}")
    return "; ".join(parts)


class log_to:
    """Send this process's stdout and stderr (progress bars, warnings, tracebacks) to a job's log file, ended
    by :func:`peak_memory_line` (after a failure: that line, then the traceback, so the error stays last)."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", buffering=1)
        self._saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self._f
        return self

    def __exit__(self, exc_type, exc, tb):
        print(peak_memory_line(), file=self._f)
        if exc is not None:  # after the memory line: a failed job's log still ends with its error
            import traceback

            traceback.print_exception(exc_type, exc, tb, file=self._f)
        sys.stdout, sys.stderr = self._saved
        self._f.close()
        return False


class job(log_to):
    """A workflow job's context (``with job(snakemake):`` in every rule's script): its log (:class:`log_to`),
    and the GPUs Snakemake granted it (its ``gpu`` resource, 0 when the rule declares none; see
    :func:`epmq.device.grant`): a job granted none computes on the CPU."""

    def __init__(self, sm):
        super().__init__(sm.log[0])
        self.gpus = int(getattr(sm.resources, "gpu", 0) or 0)
        self.outputs = [str(o) for o in sm.output]

    def __enter__(self):
        from epmq.device import grant
        from epmq.io import check_writable

        super().__enter__()
        try:
            check_writable(self.outputs)  # a read-only results folder or a full disk: one line before any work
            grant(self.gpus)
        except BaseException:
            self.__exit__(*sys.exc_info())  # the error ends the job's log, as any later one would
            raise
        return self


def packed_mb(model, results) -> float:
    """MB on disk of ``model``'s packed low-bit checkpoint (``epmq quantize --packed``: weights + config), written
    to a temp folder and measured; within fp16 scale rounding the size of the GPTQ export too."""
    import tempfile

    from epmq.quant.packed import save_quantized

    with tempfile.TemporaryDirectory(prefix="epmq-packed-") as tmp:
        return save_quantized(model, results, Path(tmp) / "packed", verify=False)["total_bytes"] / 2**20


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EPMQError(f"{path}: missing") from None
    except ValueError as err:
        raise EPMQError(f"{path}: corrupt JSON ({err})") from None


def provenance() -> dict:
    import numpy
    import torch

    import epmq

    sha = None
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"epmq": epmq.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "git_sha": sha}


# ---------------------------------------------------------------------------------------------- build


def fetch(spec: dict, out) -> dict:
    """Download / install (offline: check) what a suite's jobs will read; record it in ``out`` (JSON)."""
    suite = open_suite(spec)
    record = {"suite_type": spec["type"], "fetched": suite.prefetch(), "provenance": provenance()}
    write_json_atomic(out, record)
    return record


def build_base(spec: dict) -> Path:
    """Pretrain / load the base and compute every task's frozen head (so expert jobs only read them)."""
    suite = open_suite(spec)
    if not suite.base_path.is_file():  # the base is (re)built: heads of an older base are stale
        shutil.rmtree(suite.base_path.parent / "heads", ignore_errors=True)
    path = suite.build_base()
    for t in suite.tasks:
        suite.head(t)
    return path


def build_expert(spec: dict, task: str) -> Path:
    suite = open_suite(spec)
    meta = suite.expert_path(task).with_suffix(".json")
    if not suite.expert_path(task).is_file() and meta.is_file():
        meta.unlink()  # metadata of an expert Snakemake removed for a re-run
    return suite.build_expert(task)


# ---------------------------------------------------------------------------------------------- merge


def merge_candidates(select: dict) -> list[dict]:
    """Every combination of ``select``'s candidate values (keys in sorted order), ``[{}]`` when it is empty."""
    import itertools

    keys = sorted(select)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(select[k] for k in keys))] or [{}]


def merge(spec: dict, merge_id: str, method: str, params: dict, select: dict, out, calib=None) -> dict:
    """Merge the suite's experts; pick ``select``'s hyperparameters by mean *validation* accuracy (ties: the
    first candidate in order); write the merged encoder and a JSON record beside it. A data-aware method
    (``needs_calibration``) reads the calibration batches of ``calib`` (a :func:`calibrate` file: train split).

    Streamed: the base and the experts are read tensor by tensor from their files (never whole), and each
    candidate's merged tensors go straight to a temp file as they come -- and, when there are candidates to
    compare, into the one encoder being evaluated. The job holds one key's tensors (about T + 3 of the
    largest) plus, while selecting, that one encoder; the best candidate's file is renamed to ``out``, the
    others are deleted. The file is byte for byte what saving the whole merged state dict wrote."""
    from epmq.io import SafetensorsStream
    from epmq.merge import merge_stream
    from epmq.merge.registry import get_method

    t0 = time.perf_counter()
    suite = open_suite(spec)
    base = _lazy_sd(suite.base_path)
    experts = [_lazy_sd(suite.expert_path(t)) for t in suite.tasks]
    trials = []
    best = None  # (trial, its finished temp file)
    candidates = merge_candidates(select)
    # a suite may merge other keys than the default (t5-glue merges lm_head too, as FusionBench does)
    extra = {"exclude": suite.merge_exclude} if getattr(suite, "merge_exclude", None) is not None else {}
    if get_method(method).needs_calibration:
        extra["data"] = _merge_data(suite, method, calib)
    out = Path(out)
    try:
        for cand in candidates:
            chosen = {**params, **cand}
            stream = merge_stream(base, experts, method, **extra, **chosen)
            writer = SafetensorsStream(out, stream.layout, metadata={"epmq_merge": json.dumps(chosen)})
            trial = {"params": cand}
            try:
                if len(candidates) > 1:
                    recs = suite.evaluate_all(_merged_encoder(suite, stream, writer), split="validation")
                    recs = recs.get("tasks", recs)
                    trial["validation"] = {t: r["accuracy"] for t, r in recs.items()}
                    trial["validation_mean"] = sum(trial["validation"].values()) / len(recs)
                else:
                    for key, tensor in stream.tensors(order=writer.order):
                        writer.write(key, tensor)
                writer.finish()
            except BaseException:
                writer.discard()
                raise
            trials.append(trial)
            if best is None or trial.get("validation_mean", 0) > best[0].get("validation_mean", 0):
                if best is not None:
                    best[1].discard()
                best = (trial, writer)
            else:
                writer.discard()
        chosen = {**params, **best[0]["params"]}
        record = {"merge": merge_id, "method": method, "params": chosen,
                  "resolved_params": {**get_method(method).defaults, **chosen}, "selected_on": "validation",
                  "trials": trials, "seconds": time.perf_counter() - t0, "tasks": list(suite.tasks)}
        if "data" in extra:
            record["calibration"] = Path(calib).name
        best[1].commit()
    except BaseException:
        if best is not None:
            best[1].discard()
        raise
    write_json_atomic(out.with_suffix(".json"), record)
    return record


def _merge_data(suite, method: str, calib):
    """The :class:`epmq.merge.MergeData` of a data-aware merge: the calibration batches of ``calib``."""
    from epmq.device import resolve
    from epmq.merge import MergeData
    from epmq.models.adapters import ADAPTERS

    if calib is None:
        raise EPMQError(f"merge method {method} reads calibration data: give it a calibration file "
                        "(the workflow passes the first calibration seed's)")
    return MergeData(calib=load_calibration(calib, suite.tasks), new_model=suite.new_encoder,
                     adapter=ADAPTERS[suite.adapter], device=resolve("auto"))


def _lazy_sd(path):
    """A checkpoint as a lazy state dict (:func:`epmq.merge.lazy_state_dict`): tensors read on access."""
    from epmq.merge import lazy_state_dict

    path = Path(path)
    if not path.is_file():
        raise EPMQError(f"{path}: missing (run the stage that builds it first)")
    return lazy_state_dict(path)


def _merged_encoder(suite, stream, writer):
    """A new encoder holding ``stream``'s merged tensors, each also written to ``writer`` as it comes: one
    model in memory, not a merged state dict and a model. Each tensor goes in through ``load_state_dict``
    (non-strict, one key at a time), so loading is what loading the whole state dict did."""
    from epmq.models.sources import tied_aliases

    enc = suite.new_encoder()
    have = set(enc.state_dict())
    missing = [k for k in have if k not in stream.layout and k not in tied_aliases(enc)]  # tied copies are loaded
    unexpected = [k for k in stream.layout if k not in have]
    if missing or unexpected:
        raise EPMQError(f"{suite.name}: merged state dict mismatch (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    for key, tensor in stream.tensors(order=writer.order):
        writer.write(key, tensor)
        enc.load_state_dict({key: tensor}, strict=False)
        del tensor
    return enc.eval()


# ---------------------------------------------------------------------------------------------- calibrate


def calibrate(spec: dict, n: int, seed: int, batch_size: int, out) -> Path:
    """Draw ``n`` calibration examples per task (train split, seeded) and store the batches."""
    import torch

    suite = open_suite(spec)
    tensors, layout = {}, {}
    for t in suite.tasks:
        batches = suite.calibration_batches(t, int(n), seed=int(seed), batch_size=int(batch_size))
        layout[t] = len(batches)
        for i, b in enumerate(batches):
            if isinstance(b, torch.Tensor):
                tensors[f"{t}/{i:05d}"] = b.contiguous()
            else:
                for k, v in b.items():
                    tensors[f"{t}/{i:05d}/{k}"] = v.contiguous()
    meta = {"tasks": json.dumps(list(suite.tasks)), "batches": json.dumps(layout), "n": str(n), "seed": str(seed)}
    save_safetensors_atomic(out, tensors, metadata=meta)
    return Path(out)


def load_calibration(path, tasks) -> list[list]:
    """The per-task batch lists of a :func:`calibrate` file, in ``tasks`` order."""
    from safetensors import safe_open

    sd = _load_sd(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("tasks", "[]")) != list(tasks):
        raise EPMQError(f"{path}: calibration tasks {meta.get('tasks')} != suite tasks {list(tasks)}")
    try:
        counts = json.loads(meta["batches"])
    except (KeyError, ValueError):
        raise EPMQError(f"{path}: no batch counts in its metadata (not a calibration file?)") from None
    out = []
    for t in tasks:
        nb = counts.get(t, 0)
        if not isinstance(nb, int) or nb < 1:
            raise EPMQError(f"{path}: task {t!r} has no calibration batches ({nb!r}); rebuild it (rule calibrate)")
        batches = []
        for i in range(nb):
            key = f"{t}/{i:05d}"
            if key in sd:
                batches.append(sd[key])
            else:
                batches.append({k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + "/")})
            b = batches[-1]
            if (len(b) == 0) if isinstance(b, dict) else (b.numel() == 0):
                raise EPMQError(f"{path}: batch {key} is missing or empty; rebuild it (rule calibrate)")
        out.append(batches)
    return out


# ---------------------------------------------------------------------------------------------- quantize


@dataclasses.dataclass(frozen=True)
class QuantizeFiles:
    """What a quantize job reads and writes. ``merged``: the merged encoder (its merge record, ``merged`` with
    suffix ``.json``, is read too); ``calib``: the calibration batches (None, or not read, for a method without
    calibration; the experts a method needs are the suite's own files); ``out``: the fake-quant weights (written
    with ``QuantizeOptions.save_weights``), the quantize record going to ``out`` with suffix ``.json``;
    ``packed``: a folder for the deployable packed low-bit checkpoint (:func:`epmq.quant.packed.save_quantized`);
    ``evaluate_to``: a run record path, to evaluate the quantized encoder in this process (as :func:`evaluate`
    would), which spares a process start, a weights file and its reload per quantized model (the workflow's way)."""

    merged: str | Path
    calib: str | Path | None
    out: str | Path
    packed: str | Path | None = None
    evaluate_to: str | Path | None = None


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How a quantize job runs: ``n_calib`` (examples per task of the calibration file, for the record),
    ``device`` (:func:`epmq.device.resolve`), ``save_weights`` (write ``QuantizeFiles.out``)."""

    n_calib: int | None = None
    device: str = "auto"
    save_weights: bool = True


def quantize(spec: dict, run: QuantRun, qcfg: dict, files: QuantizeFiles,
             options: QuantizeOptions = QuantizeOptions()) -> dict:
    """Quantize ``run``'s merged encoder with ``qcfg`` (QuantConfig fields, whose method, bits and group size
    must be the run's); write its record and what ``files`` asks for (see :class:`QuantizeFiles`)."""
    import torch

    from epmq.engine import QuantConfig, quantize_model
    from epmq.device import resolve
    from epmq.merge.driver import lazy_state_dict

    cfg = QuantConfig(**qcfg)
    if (cfg.method, cfg.bits, cfg.group_size) != (run.method, run.bits, run.group_size):
        raise EPMQError(f"{run.model_id}: quantizer config {cfg.method}, {cfg.bits} bits, group size "
                        f"{cfg.group_size} is not the run's")
    suite = open_suite(spec)
    model = suite.load_encoder(files.merged)
    needs_calib = files.calib and cfg.spec.needs_calibration
    batches = load_calibration(files.calib, suite.tasks) if needs_calib else None
    experts = [lazy_state_dict(suite.expert_path(t)) for t in suite.tasks] if cfg.spec.needs_experts else None
    dev = resolve(options.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rep = quantize_model(model, batches, cfg, experts=experts, adapter=suite.adapter, device=dev,
                         progress=_isatty())
    from epmq.models.sources import unique_state_dict

    # without tied copies (T5's embed_tokens = shared): safetensors stores no shared tensors
    sd = {k: v.detach().to("cpu").contiguous() for k, v in unique_state_dict(model).items()}
    for k, v in sd.items():
        if v.is_floating_point() and not all_finite(v):
            raise EPMQError(f"quantized weight {k} has NaN/Inf ({cfg.method}, {cfg.bits} bits)")
    merged_rec = _read_json(Path(files.merged).with_suffix(".json"))
    record = {
        "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
        "quant_params": dataclasses.asdict(cfg),
        "seed": run.seed if cfg.spec.needs_calibration else None,
        "n_calib": options.n_calib if cfg.spec.needs_calibration else None,
        "merge": merged_rec["merge"], "merge_params": merged_rec["params"],
        "cost": {"quantize_seconds": rep.seconds,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 "gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None},
        "device": str(dev), "layers": len(rep.layers),
        "quantized": sorted(rep.results),
    }
    if rep.results:  # what shipping this cell costs on disk: the packed checkpoint, written and measured
        record["cost"]["packed_mb"] = packed_mb(model.to("cpu"), rep.results)
    out = Path(files.out)
    if options.save_weights:
        save_safetensors_atomic(out, sd)
    if files.evaluate_to is not None:
        _evaluate_encoder(spec, suite, run, model.to("cpu").eval(), record, files.evaluate_to)
    write_json_atomic(out.with_suffix(".json"), record)
    if files.packed is not None:
        from epmq.quant.packed import save_quantized

        if not rep.results:
            raise EPMQError(f"--packed: method {cfg.method!r} leaves no integer codes to pack")
        record["packed"] = save_quantized(model.to("cpu"), rep.results, files.packed,
                                          config={k: record[k] for k in ("method", "bits", "group_size",
                                                                         "merge", "merge_params", "seed")})
    return record


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(spec: dict, model: Model, weights, out, *, split: str = "test") -> dict:
    """Test accuracy of every task for one encoder (an expert: of its own task, the leaderboard's reference row);
    writes the run record the leaderboard reads. ``model``: an :mod:`epmq.identity` model (e.g.
    ``parse_model(suite, "merged/ties")``); a merged or quantized model's record is read beside ``weights``."""
    suite = open_suite(spec)
    side = _read_json(Path(weights).with_suffix(".json")) if isinstance(model, (Merged, QuantRun)) else {}
    return _evaluate_encoder(spec, suite, model, suite.load_encoder(weights), side, out, split=split)


def _variant(run: QuantRun, side: dict) -> dict:
    """A sweep point's knobs with the values its quantize record ``side`` used (the id's text cannot tell 1 from
    1.0; the record can)."""
    from epmq.identity import fmt_value

    variant = {}
    for knob, value in run.variant:
        used = side.get("quant_params", {}).get(knob)
        if fmt_value(used) != fmt_value(value):
            raise EPMQError(f"{run.model_id}: its quantize record has {knob}={used!r}, its id says {value!r}")
        variant[knob] = used
    return variant


def _evaluate_encoder(spec: dict, suite, model: Model, encoder, side: dict, out, *, split: str = "test") -> dict:
    """Evaluate ``encoder`` (the model ``model``; ``side`` = its merge / quantize record) and write the run record."""
    for k, v in encoder.state_dict().items():  # NaN weights score chance accuracy: never a valid record
        if v.is_floating_point() and not all_finite(v):
            raise EPMQError(f"{model.model_id}: weight {k} has NaN/Inf; not evaluated (rebuild the model that "
                            "wrote it)")
    t0 = time.perf_counter()
    if isinstance(model, Expert):
        recs = {model.task: suite.evaluate(encoder, model.task, split=split)}
    else:
        recs = suite.evaluate_all(encoder, split=split)
        recs = recs.get("tasks", recs)
    quantized = isinstance(model, QuantRun)
    record = {
        "schema": 1, "suite": model.suite, "model": model.KIND,
        "expert_task": model.task if isinstance(model, Expert) else None,
        "merge": side.get("merge"), "merge_params": side.get("merge_params", side.get("params", {})),
        "method": side.get("method") if quantized else None,
        "bits": side.get("bits"), "group_size": side.get("group_size"),
        "variant": _variant(model, side) if quantized else {},
        "quant_params": side.get("quant_params", {}), "seed": side.get("seed"), "n_calib": side.get("n_calib"),
        "split": split, "tasks": recs,
        "cost": side.get("cost", {"quantize_seconds": None, "peak_rss_mb": None, "gpu_mb": None}),
        "eval_seconds": time.perf_counter() - t0,
        "provenance": {**provenance(), "suite_type": spec["type"], "suite_seed": spec["seed"]},
    }
    write_json_atomic(out, record)
    return record


# ---------------------------------------------------------------------------------------------- report


def report(eval_paths, out_dir, *, benchmarks=(), meta: dict | None = None, anchors: dict | None = None) -> dict:
    """The leaderboard from the run records. Each quantized run's cost is joined with its quantize job's
    benchmark file when ``benchmarks`` has it (``.../quantize/<suite>/<run>.tsv`` for
    ``.../<suite>/eval/quant/<run>.json``). ``anchors`` (the config's ``anchors:``): numbers quoted from the
    literature, shown beside ours and never averaged with them (None / ``{}``: none)."""
    from epmq.report import build_leaderboard, load_runs
    from epmq.report.runs import match_benchmarks

    eval_paths = [Path(p) for p in eval_paths]
    benches = match_benchmarks(eval_paths, benchmarks)
    return build_leaderboard(load_runs(eval_paths, benches, complete=True), out_dir, meta=meta, anchors=anchors)


def run_meta(grid) -> dict:
    """The leaderboard's methodology header for a grid."""
    cal = grid.config["calibration"]
    prov = provenance()
    return {
        "calibration": f"{cal['n_per_task']} examples per task from each task's train split, batches of "
                       f"{cal['batch_size']}; {grid.config['quantize']['params'].get('propagation', 'sequential')}"
                       " propagation",
        "seeds": cal["seeds"],
        "merge selection": "hyperparameters in each merge's `select:` chosen by mean validation accuracy",
        "versions": {k: prov[k] for k in ("epmq", "torch", "numpy", "python")},
        "git_sha": prov["git_sha"],
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
    }
