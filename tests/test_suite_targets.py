"""The embedded suites' quality targets, checked on the default grid's committed leaderboard
(``reports/leaderboard.csv``, written by ``make demo``): no training here, the numbers are the ones the
README reports. Rerun the grid after changing a suite's protocol; this test then says whether the suite still
has the shape the benchmark needs -- a base weak on the tasks, strong experts, a merged model in between,
quantization that hurts.

The thresholds (the suites' design targets, unchanged from when each suite was tuned to them):

* ``expert_gain``: every expert beats the base on its own task by at least this many points (tiny-vit 15,
  minilm 10): the experts hold task knowledge the base lacks, so that a merge has something to lose.
* ``merge_gap``: the task-arithmetic merge (λ chosen on validation) is at least 3 points below the experts'
  mean: the tasks interfere. METHOD.md §5: a 3-task MiniLM trial kept 98% of expert accuracy after merging,
  too little interference to show post-merge quantization at work.
* the merge beats the base: merging is worth doing at all.
* ``rtn3_cost``: 3-bit RTN of that merge costs at least 3 points: quantization hurts, so that better
  quantizers have room to show (3 points is ~5 standard errors of a 4-task mean on 4 x 1000 examples).
* ``min_test``: every test set has at least 1000 examples (METHOD.md §5: with 600 per task the standard error
  of a task, ~0.9 points, hides 1-point differences).

Timing targets of the former ``targets`` commands (cold build <= 480 s, one model on all tasks <= 20 s) depend
on the machine and are not tested; the README's table reports the measured times.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

LEADERBOARD = Path(__file__).resolve().parent.parent / "reports" / "leaderboard.csv"

TARGETS = {
    "tiny-vit": {"expert_gain": 15.0, "merge_gap": 3.0, "rtn3_cost": 3.0, "min_test": 1000},
    "minilm": {"expert_gain": 10.0, "merge_gap": 3.0, "rtn3_cost": 3.0, "min_test": 1000},
}


def _rows(suite: str) -> list[dict]:
    with open(LEADERBOARD, newline="") as f:
        return [r for r in csv.DictReader(f) if r["suite"] == suite and r["origin"] == "ours" and r["split"] == "test"]


def _scores(rows, **match) -> dict[str, float]:
    """``{task: value}`` of the rows whose columns equal ``match`` (one row per task, else an error)."""
    out = {}
    for r in rows:
        if all(r[k] == v for k, v in match.items()):
            assert r["task"] not in out, f"two rows for {match} on {r['task']}"
            out[r["task"]] = float(r["value"])
    return out


def _mean(scores: dict) -> float:
    return sum(scores.values()) / len(scores)


@pytest.mark.parametrize("suite", sorted(TARGETS))
def test_committed_leaderboard_meets_the_suite_targets(suite):
    t = TARGETS[suite]
    rows = _rows(suite)
    base = _scores(rows, model="base")
    tasks = sorted(base)
    assert len(tasks) == 4, f"{suite}: base scored on {tasks}"
    experts = {task: _scores(rows, model="expert", expert_task=task)[task] for task in tasks}
    merged = _scores(rows, model="merged", merge="task_arithmetic")
    rtn3 = _scores(rows, model="quantized", merge="task_arithmetic", method="rtn", bits="3", group_size="-1",
                   variant="")
    assert sorted(merged) == sorted(rtn3) == tasks
    gains = {task: experts[task] - base[task] for task in tasks}
    assert min(gains.values()) >= t["expert_gain"], f"{suite}: expert - base per task {gains}"
    assert _mean(experts) - _mean(merged) >= t["merge_gap"], f"{suite}: experts {_mean(experts)}, TA {_mean(merged)}"
    assert _mean(merged) > _mean(base), f"{suite}: TA {_mean(merged)} <= base {_mean(base)}"
    assert _mean(merged) - _mean(rtn3) >= t["rtn3_cost"], f"{suite}: TA {_mean(merged)}, RTN 3-bit {_mean(rtn3)}"
    sizes = {r["task"]: int(r["n"]) for r in rows}
    assert min(sizes.values()) >= t["min_test"], f"{suite}: test sizes {sizes}"
