"""Import open_clip's model code without its image-transform stack.

``import open_clip`` pulls in torchvision (transforms, ``FrozenBatchNorm2d``), which has no CPU wheel that
imports beside the CPU build of torch this project installs. The vision transformer itself needs none of
it, so :func:`open_clip_transformer` imports ``open_clip.transformer`` directly: when torchvision is
importable the real package is used unchanged; otherwise the package ``__init__`` is skipped and the one
torchvision symbol ``open_clip.utils`` imports at module level (``FrozenBatchNorm2d``, used only to freeze
ResNet batch norms) is provided as a placeholder that raises if it is ever called.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _torchvision_ok() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means: do without it
        return False
    return True


def open_clip_transformer():
    """The ``open_clip.transformer`` module (``VisionTransformer``, ``ResidualAttentionBlock``, ...)."""
    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        from epmq.errors import EPMQError

        raise EPMQError("open_clip is not installed: pip install --no-deps open_clip_torch")
    if _torchvision_ok():
        return importlib.import_module("open_clip.transformer")
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec  # importlib.util.find_spec("open_clip") keeps working (it raises on a None spec)
        sys.modules["open_clip"] = pkg
    if "torchvision.ops.misc" not in sys.modules:

        class FrozenBatchNorm2d:  # placeholder: ViTs never freeze batch norms
            def __init__(self, *a, **k):
                raise RuntimeError("FrozenBatchNorm2d needs torchvision, which is not installed")

        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
        try:
            return importlib.import_module("open_clip.transformer")
        finally:
            for name in ("torchvision.ops.misc", "torchvision.ops", "torchvision"):
                sys.modules.pop(name, None)
    return importlib.import_module("open_clip.transformer")


def tiny_vision_transformer(*, image_size=28, patch_size=4, width=32, layers=2, heads=2, output_dim=16, mlp_ratio=4.0):
    """An open_clip ``VisionTransformer`` (real module structure: fused ``in_proj``, ``mlp.c_fc/c_proj``)."""
    T = open_clip_transformer()
    return T.VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=mlp_ratio,
        output_dim=output_dim,
    )
