"""The eight GLUE tasks of the FLAN-T5 merging benchmark, as text-to-text problems.

Data: ``nyu-mll/glue`` with config = task name, scored on ``validation`` (MNLI: ``validation_matched``); the
hub's test splits carry no labels (label -1) and are refused by :func:`score`.

Prompt style: one natural-language instruction per task that names the admissible answers, worded as the
prompts the FusionBench experts ``tanganke/flan-t5-base_glue-<task>`` were fine-tuned on (quirks such as
"Answere" kept on purpose: a fine-tuned seq2seq expert is sensitive to the exact prompt it was trained with).
Targets are single label words (:func:`label_words`, index = GLUE label id), so decoding needs only a few
tokens.

STS-B is text-to-text regression: the target is the gold similarity (0..5) written with one decimal
(``"3.8"``), the model generates a number, :func:`parse_stsb` reads it back and :func:`score` reports Pearson
and Spearman correlation. A generation with no number in it counts as 0.0 (as FusionBench does) and is
tallied under ``unparsed``.

Classification scoring compares ``prediction.strip().lower()`` with the reference's label word: accuracy for
every task, plus Matthews correlation for CoLA, where a prediction that is no label word counts as the wrong
class. All metrics are fractions in [-1, 1] / [0, 1], not percentages. Only numpy is needed.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from epmq.errors import EPMQError

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
HF_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its evaluation data lives, its prompt and its answer words."""

    name: str
    eval_split: str
    template: str  # str.format string over the dataset's text columns
    fields: tuple[str, ...]  # the text columns the template reads
    label_words: tuple[str, ...]  # index = GLUE label id; empty for the regression task stsb
    metric: str  # the headline metric: "accuracy" or "spearman"
    hf_dataset: str = HF_DATASET

    @property
    def hf_config(self) -> str:
        return self.name

    @property
    def is_regression(self) -> bool:
        return not self.label_words


def _task(name, template, label_words, *, split="validation", metric="accuracy") -> GlueTask:
    fields = tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)
    return GlueTask(name, split, template, fields, tuple(label_words), metric)


_TASKS = {t.name: t for t in (
    _task("cola", "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
                  "Answere 'acceptable' or 'unacceptable'.", ("unacceptable", "acceptable")),
    _task("mnli", "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
                  "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
          ("entailment", "neutral", "contradiction"), split="validation_matched"),
    _task("mrpc", "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
                  "Answere with 'yes' or 'no'.", ("no", "yes")),
    # GLUE QNLI/RTE: label 0 = entailment, 1 = not_entailment
    _task("qnli", "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
                  "information provided? Answer with 'yes' or 'no'.", ("yes", "no")),
    _task("qqp", "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
          ("no", "yes")),
    _task("rte", "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
          ("yes", "no")),
    _task("sst2", "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
          ("negative", "positive")),
    _task("stsb", "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely "
                  "different) to 5 (completely similar), rate the similarity.", (), metric="spearman"),
)}
assert tuple(_TASKS) == GLUE_TASKS


def get_glue_task(task: str | GlueTask) -> GlueTask:
    if isinstance(task, GlueTask):
        return task
    key = task.strip().lower().replace("-", "") if isinstance(task, str) else None
    if key not in _TASKS:
        raise EPMQError(f"unknown GLUE task {task!r}: expected one of {list(GLUE_TASKS)}")
    return _TASKS[key]


def format_example(task: str | GlueTask, example: dict) -> str:
    """The model input for one dataset row (a dict holding at least the task's text columns)."""
    t = get_glue_task(task)
    missing = [f for f in t.fields if f not in example]
    if missing:
        raise EPMQError(f"GLUE {t.name}: example lacks column(s) {missing} (has {sorted(example)})")
    return t.template.format(**{f: example[f] for f in t.fields})


def label_words(task: str | GlueTask) -> tuple[str, ...]:
    """The answer word of each class (index = GLUE label id); STS-B is regression and has none."""
    t = get_glue_task(task)
    if t.is_regression:
        raise EPMQError(f"GLUE {t.name}: a regression task has no label words (targets are numbers, see target_text)")
    return t.label_words


def target_text(task: str | GlueTask, label) -> str:
    """The training/reference target string for a gold label (a label word, or ``"3.8"`` for STS-B)."""
    t = get_glue_task(task)
    if t.is_regression:
        return f"{_stsb_label(t, label):.1f}"
    return t.label_words[_class_label(t, label)]


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_stsb(text: str) -> float | None:
    """The first number in a generated STS-B answer (``"3.8"``, ``" 4 "``, ``"score: 2.5"``), or None."""
    if not isinstance(text, str):
        return None
    m = _NUMBER.search(text)
    if m is None:
        return None
    v = float(m.group())
    return v if math.isfinite(v) else None


def _class_label(t: GlueTask, ref) -> int:
    """A reference as a class index: an int label id or one of the label words."""
    if isinstance(ref, str):
        word = ref.strip().lower()
        if word in t.label_words:
            return t.label_words.index(word)
    elif not isinstance(ref, bool):
        try:
            i = int(ref)
        except (TypeError, ValueError):
            i = None
        if i is not None and i == ref and 0 <= i < len(t.label_words):
            return i
    raise EPMQError(f"GLUE {t.name}: reference {ref!r} is neither a label id in 0..{len(t.label_words) - 1} "
                    f"nor one of {list(t.label_words)} (test-split rows carry label -1)")


def _stsb_label(t: GlueTask, ref) -> float:
    v = parse_stsb(ref) if isinstance(ref, str) else ref
    try:
        v = float(v)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or not -1e-6 <= v <= 5 + 1e-6:
        raise EPMQError(f"GLUE {t.name}: reference {ref!r} is not a similarity score in [0, 5]")
    return v


def _paired(x, y, what: str):
    """``x``, ``y`` as float64 arrays, checked to be two 1-D sequences of equal length >= 2."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise EPMQError(f"{what}: need two 1-D sequences of equal length >= 2, got shapes {x.shape} and {y.shape}")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences (nan when either is constant)."""
    x, y = _paired(x, y, "pearson")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(xc @ yc) / den))


def _average_ranks(x):
    """Ranks 1..n of ``x``, ties sharing the mean of the ranks they span."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty_like(x)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of the average ranks; nan when either is constant)."""
    x, y = _paired(x, y, "spearman")
    return pearson(_average_ranks(x), _average_ranks(y))


def matthews_corrcoef(y_true, y_pred) -> float:
    """Matthews correlation of two binary (0/1) sequences; 0.0 when a margin is empty (sklearn's convention)."""
    tp = fp = tn = fn = 0
    for t, p in zip(y_true, y_pred, strict=True):
        if t and p:
            tp += 1
        elif t:
            fn += 1
        elif p:
            fp += 1
        else:
            tn += 1
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if den == 0 else (tp * tn - fp * fn) / math.sqrt(den)


def score(task: str | GlueTask, predictions: list[str], references: list) -> dict:
    """Score generated answers against gold labels.

    ``references`` are GLUE label ids (or label words); for STS-B, gold similarity scores. Returns
    ``{"accuracy", "n", "invalid"}`` (+ ``"matthews_corr"`` for CoLA), or for STS-B
    ``{"pearson", "spearman", "n", "unparsed"}``; ``invalid`` / ``unparsed`` count predictions that are no
    label word / hold no number.
    """
    t = get_glue_task(task)
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise EPMQError(f"GLUE {t.name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise EPMQError(f"GLUE {t.name}: nothing to score (0 predictions)")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise EPMQError(f"GLUE {t.name}: prediction {i} is {type(p).__name__}, expected the generated string")
    n = len(predictions)
    if t.is_regression:
        gold = [_stsb_label(t, r) for r in references]
        parsed = [parse_stsb(p) for p in predictions]
        pred = [0.0 if v is None else v for v in parsed]
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold), "n": n,
                "unparsed": sum(v is None for v in parsed)}
    gold = [_class_label(t, r) for r in references]
    words = {w: i for i, w in enumerate(t.label_words)}
    pred = [words.get(p.strip().lower(), -1) for p in predictions]
    out = {"accuracy": sum(p == g for p, g in zip(pred, gold, strict=True)) / n, "n": n,
           "invalid": sum(p < 0 for p in pred)}
    if t.name == "cola":
        # an answer that is no label word counts as the wrong class
        binary = [p if p >= 0 else 1 - g for p, g in zip(pred, gold, strict=True)]
        out["matthews_corr"] = matthews_corrcoef(gold, binary)
    return out
