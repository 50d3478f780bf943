"""Read and check per-run evaluation JSONs (schema 1) and the Snakemake benchmark TSVs of their quantize jobs.

Every problem raises a one-line :class:`~epmq.errors.EPMQError` that starts with the file at fault.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from epmq.errors import EPMQError
from epmq.report.names import MODEL_ORDER, compact_json, variant_str

SCHEMA = 1
_COST_KEYS = ("quantize_seconds", "peak_rss_mb", "gpu_mb", "packed_mb")
_MISSING = {"", "-", "NA", "na", "NaN", "nan", "None"}
#: a task record whose ``metric`` is one of these carries a correlation x 100 in ``accuracy`` (t5-glue's STS-B:
#: Spearman), so its range is [-100, 100]
CORRELATION_METRICS = ("spearman", "pearson", "matthews_corr")


def _fail(source: str, msg: str):
    raise EPMQError(f"{source}: {msg}")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt(obj: dict, key: str, source: str, check, what: str, default=None):
    v = obj.get(key, default)
    if v is not None and not check(v):
        _fail(source, f"{key}={v!r}: expected {what}")
    return v


def _dict(obj: dict, key: str, source: str) -> dict:
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        _fail(source, f"{key}={v!r}: expected an object")
    return dict(v)


def _task_record(name, rec, source: str) -> dict:
    where = f"tasks[{name!r}]"
    if not isinstance(rec, dict):
        _fail(source, f"{where}: expected an object with 'accuracy'")
    if "accuracy" not in rec:
        _fail(source, f"{where}: missing key 'accuracy'")
    acc = rec["accuracy"]
    low = -100.0 if rec.get("metric") in CORRELATION_METRICS else 0.0  # a correlation x 100 may be negative
    if not _is_num(acc) or not low <= acc <= 100.0:
        _fail(source, f"{where}.accuracy={acc!r}: expected a percentage in [{low:g}, 100]")
    n = _opt(rec, "n", source, lambda x: _is_int(x) and x > 0, "a positive integer")
    correct = _opt(rec, "correct", source, lambda x: _is_int(x) and x >= 0, "a non-negative integer")
    se = _opt(rec, "stderr", source, lambda x: _is_num(x) and x >= 0, "a non-negative number")
    if se is None and n is not None and low == 0.0:  # binomial standard error, as accuracy_record computes it
        p = acc / 100.0
        se = 100.0 * math.sqrt(p * (1 - p) / n)
    out = dict(rec)
    out.update(task=name, accuracy=float(acc), n=n, correct=correct, stderr=None if se is None else float(se))
    return out


def normalize_run(obj, source: str) -> dict:
    """Check one run record against schema 1 and return a normalised copy (defaults filled, ``source`` set).

    Unknown keys are kept (forward compatible); keys the report relies on are checked strictly.
    """
    if not isinstance(obj, dict):
        _fail(source, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("schema", "suite", "model", "tasks"):
        if key not in obj:
            _fail(source, f"missing key {key!r}")
    if obj["schema"] != SCHEMA or isinstance(obj["schema"], bool):
        _fail(source, f"schema={obj['schema']!r}: this report reads schema {SCHEMA}")
    suite, model = obj["suite"], obj["model"]
    if not isinstance(suite, str) or not suite:
        _fail(source, f"suite={suite!r}: expected a non-empty string")
    if model not in MODEL_ORDER:
        _fail(source, f"model={model!r}: expected one of {list(MODEL_ORDER)}")

    def name_field(key: str):
        return _opt(obj, key, source, lambda x: isinstance(x, str) and x != "", "a non-empty string or null")

    expert_task, merge, method = name_field("expert_task"), name_field("merge"), name_field("method")
    bits = _opt(obj, "bits", source, lambda x: _is_int(x) and x > 0, "a positive integer or null")
    group_size = _opt(obj, "group_size", source, _is_int, "an integer or null")
    seed = _opt(obj, "seed", source, _is_int, "an integer or null")
    n_calib = _opt(obj, "n_calib", source, lambda x: _is_int(x) and x >= 0, "a non-negative integer or null")
    split = _opt(obj, "split", source, lambda x: isinstance(x, str), "a string", default="test")
    merge_params, variant = _dict(obj, "merge_params", source), _dict(obj, "variant", source)

    # the model kind decides which identity fields must (not) be set
    if model == "expert" and expert_task is None:
        _fail(source, "model='expert' needs expert_task (the task the expert was fine-tuned on)")
    if model in ("merged", "quantized") and merge is None:
        _fail(source, f"model={model!r} needs merge (the merge method)")
    if model == "quantized":
        if method is None:
            _fail(source, "model='quantized' needs method (the quantization method)")
        if "bits" not in obj:
            _fail(source, "missing key 'bits'")
    else:
        for key, val in (("method", method), ("bits", bits), ("group_size", group_size)):
            if val is not None:
                _fail(source, f"{key}={val!r} on a model={model!r} run: only quantized runs have one")
        if variant:
            _fail(source, f"variant={variant!r} on a model={model!r} run: only quantized runs have one")
    if model in ("base", "expert") and merge is not None:
        _fail(source, f"merge={merge!r} on a model={model!r} run")

    tasks = obj["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        _fail(source, "tasks: expected a non-empty object {task: {accuracy, stderr, n, ...}}")
    for name in tasks:
        if not isinstance(name, str) or not name:
            _fail(source, f"tasks: task name {name!r} is not a non-empty string")
    tasks = {name: _task_record(name, rec, source) for name, rec in tasks.items()}

    cost = _dict(obj, "cost", source)
    for key in _COST_KEYS:
        v = cost.get(key)
        if v is not None and not (_is_num(v) and v >= 0):
            _fail(source, f"cost.{key}={v!r}: expected a non-negative number or null")
        cost[key] = None if v is None else float(v)

    out = dict(obj)
    out.update(
        suite=suite,
        model=model,
        expert_task=expert_task,
        merge=merge,
        merge_params=merge_params,
        method=method,
        bits=bits,
        group_size=group_size,
        variant=variant,
        quant_params=_dict(obj, "quant_params", source),
        seed=seed,
        n_calib=n_calib,
        split=split,
        tasks=tasks,
        cost=cost,
        provenance=_dict(obj, "provenance", source),
        source=source,
    )
    return out


def identity(run: dict) -> tuple:
    """What makes a run unique: everything but the scores, cost, provenance and n_calib."""
    return (
        run["suite"],
        run["model"],
        run["expert_task"],
        run["merge"],
        compact_json(run["merge_params"]),
        run["method"],
        run["bits"],
        run["group_size"],
        variant_str(run["variant"]),
        run["seed"],
    )


def check_unique(runs: list[dict]) -> None:
    """Two files for the same (model, merge, method, bits, group size, variant, seed) would be averaged as if
    they were two seeds: refuse instead, naming both files."""
    seen: dict[tuple, str] = {}
    for run in runs:
        key = identity(run)
        if key in seen:
            raise EPMQError(
                f"{run['source']}: describes the same run as {seen[key]} (suite={run['suite']!r}, "
                f"model={run['model']!r}, merge={run['merge']!r}, method={run['method']!r}, bits={run['bits']!r}, "
                f"group_size={run['group_size']!r}, variant={variant_str(run['variant'])!r}, seed={run['seed']!r}); "
                "give a sweep point a distinct `variant`"
            )
        seen[key] = run["source"]


def _cell(value: str, column: str, source: str):
    value = value.strip()
    if value in _MISSING:
        return None
    try:
        x = float(value)
    except ValueError:
        x = None
    if x is None:
        _fail(source, f"column {column!r}: {value!r} is not a number")
    return x if math.isfinite(x) else None


def read_benchmark(path: str | Path) -> dict:
    """``{"seconds", "max_rss_mb"}`` from a Snakemake benchmark TSV (``s``, ``max_rss`` in MB; "-"/"NA" -> None).

    With several rows (``benchmark: repeat(...)``), seconds is their median and max_rss their maximum.
    """
    source = str(path)
    text = problem = None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = "no such benchmark file"
    except (OSError, UnicodeDecodeError) as e:
        problem = f"cannot read benchmark file ({e})"
    if problem:
        _fail(source, problem)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        _fail(source, "benchmark file has no data row (expected a header line and one row per repeat)")
    header = lines[0].split("\t")
    for col in ("s", "max_rss"):
        if col not in header:
            _fail(source, f"benchmark header lacks column {col!r} (got {header})")
    secs, rss = [], []
    for i, line in enumerate(lines[1:], start=2):
        row = line.split("\t")
        if len(row) != len(header):
            _fail(source, f"line {i} has {len(row)} fields, the header {len(header)}")
        rec = dict(zip(header, row))
        secs.append(_cell(rec["s"], "s", source))
        rss.append(_cell(rec["max_rss"], "max_rss", source))
    secs = [x for x in secs if x is not None]
    rss = [x for x in rss if x is not None]
    return {"seconds": statistics.median(secs) if secs else None, "max_rss_mb": max(rss) if rss else None}


def match_benchmarks(eval_paths: Iterable[str | Path], bench_paths: Iterable[str | Path]) -> list[Path | None]:
    """For each run record, the quantize job benchmark of the same run (:mod:`epmq.identity`: record
    ``<results>/<suite>/eval/quant/<run>.json``, benchmark ``.../quantize/<suite>/<run>.tsv``), else None: a
    :func:`load_runs` ``bench_paths``. A record at another path (assembled by hand) has none; a benchmark that
    is not a quantize job's is an error naming it."""
    from epmq.identity import QuantRun, parse_benchmark, parse_eval_path

    by_run = {parse_benchmark(b): Path(b) for b in bench_paths}
    out = []
    for p in eval_paths:
        try:
            model = parse_eval_path(p)
        except EPMQError:
            model = None
        out.append(by_run.get(model) if isinstance(model, QuantRun) else None)
    return out


def load_runs(eval_paths: Iterable[str | Path], bench_paths: Iterable[str | Path | None] | None = None, *,
              complete: bool = False) -> list[dict]:
    """Read and check the evaluation JSONs, in the given order, as normalised run dicts (``source`` = path).

    ``bench_paths``, when given, runs parallel to ``eval_paths`` (entries may be None): the Snakemake benchmark
    TSV of each run's quantize job. It fills ``cost.quantize_seconds`` (only where the JSON has none: the
    evaluator's own timing excludes process start-up) and ``cost.peak_rss_mb`` (the job's max_rss, which wins
    over a JSON value: it is the whole job's peak, the number a user has to provision for).

    ``complete`` (the workflow's report): every model but the experts must have a result for every task its
    suite's other runs have, else one error naming the record. Without it such a run shows "–" for the missing
    task and no Avg (the library's tolerant reading, for records assembled by hand).
    """
    if isinstance(eval_paths, (str, Path)):
        eval_paths = [eval_paths]
    eval_paths = list(eval_paths)
    if bench_paths is None:
        bench_paths = [None] * len(eval_paths)
    else:
        bench_paths = [bench_paths] if isinstance(bench_paths, (str, Path)) else list(bench_paths)
        if len(bench_paths) != len(eval_paths):
            raise EPMQError(
                f"load_runs: {len(bench_paths)} benchmark path(s) for {len(eval_paths)} evaluation file(s): "
                "bench_paths must run parallel to eval_paths (use None where a run has no benchmark)"
            )
    runs = []
    for path, bench in zip(eval_paths, bench_paths):
        source, problem = str(path), None
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problem = "no such evaluation file"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        except UnicodeDecodeError:
            problem = "not valid UTF-8 text"
        except OSError as e:
            problem = f"cannot read evaluation file ({e.strerror or e})"
        if problem:
            _fail(source, problem)
        run = normalize_run(obj, source)
        if bench is not None:
            b = read_benchmark(bench)
            run["cost"]["benchmark"] = str(bench)
            if run["cost"]["quantize_seconds"] is None:
                run["cost"]["quantize_seconds"] = b["seconds"]
            if b["max_rss_mb"] is not None:
                run["cost"]["peak_rss_mb"] = b["max_rss_mb"]
        runs.append(run)
    if complete:
        _check_complete(runs)
    return runs


def _check_complete(runs: list[dict]) -> None:
    """Every model except the experts (scored on their own task) has a result for every task its suite's other
    models have: an Avg over fewer tasks, or a seed dropped from a mean, must never pass silently."""
    tasks: dict[str, set] = {}
    for r in runs:
        if r["model"] != "expert":
            tasks.setdefault(r["suite"], set()).update(r["tasks"])
    for r in runs:
        if r["model"] != "expert":
            missing = sorted(tasks[r["suite"]] - set(r["tasks"]))
            if missing:
                _fail(r["source"], f"no result for task(s) {missing}, which other {r['suite']} runs have "
                                   "(re-run this evaluation)")
