"""Benchmark suites, by name. Entries are import paths so that listing suites imports no torch."""

from __future__ import annotations

import importlib

SUITES: dict[str, str] = {
    "tiny-vit": "epmq.suites.tiny_vit:TinyViTSuite",
    "minilm": "epmq.suites.minilm:MiniLMSuite",
}


def get_suite(name: str, cache_dir, **options):
    """Instantiate the suite called ``name`` with its cache folder."""
    from epmq.errors import EPMQError

    if name not in SUITES:
        raise EPMQError(f"suite={name!r}: expected one of {sorted(SUITES)}")
    module, cls = SUITES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cache_dir, **options)
