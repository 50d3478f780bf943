"""Evaluation records shared by every suite: per-task top-1 accuracy with its standard error, one JSON per
(model, task), written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


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


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON via a temp file + ``os.replace`` (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
