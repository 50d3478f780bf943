"""Benchmark suites, by name. Entries are import paths so that listing suites imports no torch."""

from __future__ import annotations

import importlib

SUITES: dict[str, str] = {
    "tiny-vit": "epmq.suites.tiny_vit:TinyViTSuite",
    "minilm": "epmq.suites.minilm:MiniLMSuite",
    "clip": "epmq.suites.clip:ClipSuite",
    "t5-glue": "epmq.suites.glue_t5:T5GlueSuite",
}

#: each suite's default task list (the suites' ``DEFAULTS["tasks"]``; a test keeps them equal), readable
#: without importing torch -- the workflow needs it to build its job list.
DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "tiny-vit": ("fashion_mnist", "mnist", "digits", "textures"),
    "minilm": ("tweet_sentiment", "spam", "fine_food", "tweet_device"),
    # the paper's 8 CLIP tasks (epmq.tasks.clip.TASKS_8)
    "clip": ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"),
    # FLAN-T5-base's 8 GLUE tasks (epmq.tasks.glue.GLUE_TASKS)
    "t5-glue": ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"),
}


def get_suite(name: str, cache_dir, **options):
    """Instantiate the suite called ``name`` with its cache folder."""
    from epmq.errors import EPMQError

    if name not in SUITES:
        raise EPMQError(f"suite={name!r}: expected one of {sorted(SUITES)}")
    module, cls = SUITES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cache_dir, **options)
