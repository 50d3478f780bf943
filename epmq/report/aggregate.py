"""From checked runs to per-suite aggregates: each (merge, method, bits, group size, variant) group's per-task
and Avg statistics over calibration seeds. Pure Python (no pandas), so the numbers are easy to audit."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from epmq.report.names import (
    MODEL_ORDER,
    compact_json,
    group_size_key,
    method_rank,
    none_first,
    variant_str,
)

#: A merge setting: (merge method, canonical JSON of its hyperparameters).
MergeKey = tuple  # (str, str)
#: A quantized group: (merge key, method, bits, group_size, canonical variant string).
QuantKey = tuple


def mean(xs) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs)


def sample_std(xs) -> float | None:
    """Sample standard deviation (n − 1); None for fewer than two values."""
    xs = list(xs)
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class Stat:
    """One cell: mean and sample std over seeds, the test-set standard error (mean over seeds), the values."""

    mean: float | None = None
    std: float | None = None
    se: float | None = None
    values: tuple = ()

    @property
    def n(self) -> int:
        return len(self.values)


EMPTY = Stat()


def stat(values, ses) -> Stat:
    values = list(values)
    if not values:
        return EMPTY
    ses = [s for s in ses if s is not None]
    return Stat(mean(values), sample_std(values), mean(ses) if ses else None, tuple(values))


@dataclass(frozen=True)
class Obs:
    """One seed's scores: {task: (accuracy, stderr)}."""

    seed: int | None
    scores: dict


@dataclass
class Agg:
    """A group of runs that differ only in the calibration seed."""

    seeds: tuple
    task: dict  # task -> Stat
    avg: Stat
    avg_by_seed: dict  # seed -> per-seed unweighted task mean (only seeds that have every task)

    def cell(self, task: str) -> Stat:
        return self.task.get(task, EMPTY)


def aggregate(obs: list[Obs], tasks: list[str]) -> Agg:
    obs = sorted(obs, key=lambda o: none_first(o.seed))
    per_task = {}
    for t in tasks:
        got = [o.scores[t] for o in obs if t in o.scores]
        per_task[t] = stat([a for a, _ in got], [s for _, s in got])
    avg_vals, avg_ses, by_seed = [], [], {}
    for o in obs:
        if not all(t in o.scores for t in tasks):
            continue  # a mean over a subset of tasks is not comparable: leave this seed out of Avg
        a = mean(o.scores[t][0] for t in tasks)
        ses = [o.scores[t][1] for t in tasks]
        avg_vals.append(a)
        avg_ses.append(None if any(s is None for s in ses) else math.sqrt(math.fsum(s * s for s in ses)) / len(tasks))
        by_seed[o.seed] = a
    return Agg(tuple(o.seed for o in obs), per_task, stat(avg_vals, avg_ses), by_seed)


def _obs(run: dict) -> Obs:
    return Obs(run["seed"], {t: (r["accuracy"], r["stderr"]) for t, r in run["tasks"].items()})


def run_sort_key(run: dict) -> tuple:
    """The leaderboard's stable order of runs."""
    return (
        run["suite"],
        MODEL_ORDER[run["model"]],
        none_first(run["expert_task"]),
        none_first(run["merge"]),
        compact_json(run["merge_params"]),
        method_rank(run["method"]) if run["method"] is not None else (-1, ""),
        none_first(run["bits"]),
        group_size_key(run["group_size"]),
        variant_str(run["variant"]),
        none_first(run["seed"]),
        none_first(run["n_calib"]),
    )


@dataclass
class SuiteData:
    suite: str
    tasks: list  # sorted task names
    runs: list  # this suite's runs, in leaderboard order
    base: Agg | None = None
    experts: Agg | None = None  # pseudo-runs: per seed, expert t's accuracy on task t
    merge_keys: list = field(default_factory=list)  # sorted MergeKeys (FP merged or quantized)
    merge_params: dict = field(default_factory=dict)  # MergeKey -> params dict
    fp: dict = field(default_factory=dict)  # MergeKey -> Agg
    quant: dict = field(default_factory=dict)  # QuantKey -> Agg
    variants: dict = field(default_factory=dict)  # canonical variant string -> variant dict
    quant_params: dict = field(default_factory=dict)  # QuantKey -> quant_params shared by all its runs
    test_sizes: dict = field(default_factory=dict)  # task -> sorted distinct n

    def show_params(self, merge: str) -> bool:
        """Whether quantized rows must name the merge hyperparameters (more than one setting of that merge)."""
        return sum(1 for mk in self.merge_keys if mk[0] == merge) > 1

    def quant_keys(self, *, default: bool | None = None) -> list:
        keys = [k for k in self.quant if default is None or (k[4] == "") == default]
        return sorted(keys, key=quant_sort_key)


def quant_sort_key(k: QuantKey) -> tuple:
    mk, method, bits, gs, var = k
    return (mk, none_first(bits), group_size_key(gs), method_rank(method), var)


def collect(runs: list[dict]) -> list[SuiteData]:
    """Group checked runs by suite; aggregate every group over seeds. Suites sorted by name."""
    by_suite = defaultdict(list)
    for run in sorted(runs, key=run_sort_key):
        by_suite[run["suite"]].append(run)
    out = []
    for suite in sorted(by_suite):
        srs = by_suite[suite]
        tasks = sorted({t for r in srs for t in r["tasks"]})
        sd = SuiteData(suite, tasks, srs)
        sizes = defaultdict(set)
        for r in srs:
            for t, rec in r["tasks"].items():
                if rec.get("n") is not None:
                    sizes[t].add(rec["n"])
        sd.test_sizes = {t: sorted(v) for t, v in sorted(sizes.items())}

        base = [_obs(r) for r in srs if r["model"] == "base"]
        sd.base = aggregate(base, tasks) if base else None

        diag = defaultdict(dict)  # seed -> {task: (acc, se)} from expert t on its own task t
        for r in srs:
            if r["model"] == "expert" and r["expert_task"] in r["tasks"]:
                rec = r["tasks"][r["expert_task"]]
                diag[r["seed"]][r["expert_task"]] = (rec["accuracy"], rec["stderr"])
        sd.experts = aggregate([Obs(s, sc) for s, sc in diag.items()], tasks) if diag else None

        fp, quant, qparams = defaultdict(list), defaultdict(list), defaultdict(list)
        for r in srs:
            if r["model"] not in ("merged", "quantized"):
                continue
            mk = (r["merge"], compact_json(r["merge_params"]))
            sd.merge_params[mk] = r["merge_params"]
            if r["model"] == "merged":
                fp[mk].append(_obs(r))
            else:
                var = variant_str(r["variant"])
                sd.variants[var] = r["variant"]
                qk = (mk, r["method"], r["bits"], r["group_size"], var)
                quant[qk].append(_obs(r))
                qparams[qk].append(r["quant_params"])
        sd.merge_keys = sorted(sd.merge_params)
        sd.fp = {mk: aggregate(o, tasks) for mk, o in sorted(fp.items())}
        sd.quant = {qk: aggregate(quant[qk], tasks) for qk in sorted(quant, key=quant_sort_key)}
        for qk, qps in qparams.items():  # the settings every seed of the group agrees on
            first, *rest = qps
            sd.quant_params[qk] = {
                k: v for k, v in first.items() if all(k in q and compact_json(q[k]) == compact_json(v) for q in rest)
            }
        out.append(sd)
    return out
