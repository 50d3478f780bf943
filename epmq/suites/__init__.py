"""Benchmark suites, by name. Entries are import paths so that listing suites imports no torch.

Layout
    * :mod:`epmq.suites.base` -- the skeleton: :class:`~epmq.suites.base.Suite`, what every suite provides (name,
      adapter, options, base / heads / experts, calibration batches, the evaluation of ONE task) and what it
      gets (cache layout, option check, ``build_all``, the one evaluation loop ``evaluate_all``);
    * :mod:`epmq.suites._hub` -- :class:`~epmq.suites._hub.HubSuite`, what the hub-backed suites share
      (revisions, downloads, seeded splits, the preprocessed-data cache, expert import, their CLI);
    * :mod:`epmq.suites._splits` -- the split cache of the embedded suites;
    * one module per suite: ``tiny_vit`` and ``minilm`` (embedded, offline), ``clip`` and ``glue_t5`` (hub).

A new suite: a :class:`~epmq.suites.base.Suite` (or ``HubSuite``) subclass, an entry in :data:`SUITES` and
:data:`DEFAULT_TASKS` (a test keeps the latter equal to the suite's ``DEFAULTS["tasks"]``), and its name in the
workflow schema's ``suites.*.type`` enum. No suite module imports from another suite module.
"""

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
