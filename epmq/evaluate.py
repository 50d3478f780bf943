"""Evaluation records shared by every suite: per-task top-1 accuracy with its standard error, one JSON per
(model, task), written atomically."""

from __future__ import annotations

import math

from epmq.io import write_json_atomic  # noqa: F401  (re-exported: suites write their records with it)


def accuracy_record(task: str, split: str, correct: int, n: int, **extra) -> dict:
    """``{"task", "split", "n", "correct", "accuracy", "stderr"}``; accuracy in percent, binomial stderr."""
    if n <= 0:
        from epmq.errors import EPMQError

        raise EPMQError(f"{task}/{split}: no examples to evaluate")
    p = correct / n
    return {
        "task": task,
        "split": split,
        "n": int(n),
        "correct": int(correct),
        "accuracy": 100.0 * p,
        "stderr": 100.0 * math.sqrt(p * (1 - p) / n),
        **extra,
    }
