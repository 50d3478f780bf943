"""Architecture adapters: where the blocks and the quantizable Linears of a model are.

All architecture knowledge lives here, never inside the algorithms (llm-awq's ``get_blocks`` idea). An
adapter gives

* ``find_blocks(model)``: the transformer blocks in forward order, each with its state-dict prefix;
* ``find_linears(block)``: the block's quantizable weights as true-sequential groups of :class:`Site` s
  (q/k/v or the fused ``in_proj`` -> attention out -> fc1 -> fc2);
* ``run(model, batch)``: one forward pass on a calibration batch (far enough to reach every block).

A :class:`Site` is a weight matrix ``y = W x (+ b)`` and how to capture its input ``x``: a forward
pre-hook on an ``nn.Linear`` (``kind="linear"``), the query of a self-attention ``nn.MultiheadAttention``
for its fused ``in_proj_weight`` (``kind="mha_in"``), or the attention context feeding
``nn.MultiheadAttention.out_proj`` (``kind="mha_out"``; its forward is never called by
``F.multi_head_attention_forward``, so the context is recomputed with an identity output projection).
Embeddings, LayerNorms, heads and the patch convolution are not sites: they stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from epmq.errors import EPMQError


@dataclass
class Site:
    """One quantizable weight of a block.

    ``name``: path of the weight parameter inside the block (e.g. ``attn.in_proj_weight``);
    ``owner``: the module holding it; ``weight_attr`` / ``bias_attr``: attribute names on ``owner``;
    ``kind``: how its input is captured; ``input_key``: sites of one group with the same key see the same
    input (q/k/v), so their statistics are computed once.
    """

    name: str
    owner: nn.Module
    weight_attr: str
    bias_attr: str | None
    kind: str  # "linear" | "mha_in" | "mha_out"
    input_key: str

    @property
    def weight(self):
        return getattr(self.owner, self.weight_attr)

    @property
    def bias(self):
        return getattr(self.owner, self.bias_attr) if self.bias_attr else None

    @property
    def bias_name(self) -> str | None:
        if self.bias_attr is None or self.bias is None:
            return None
        return self.name.rsplit(".", 1)[0] + "." + self.bias_attr if "." in self.name else self.bias_attr


def _linear(block: nn.Module, path: str, input_key: str) -> Site:
    mod = block.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise EPMQError(f"{path}: expected nn.Linear, found {type(mod).__name__}")
    return Site(f"{path}.weight", mod, "weight", "bias", "linear", input_key)


@dataclass
class Adapter:
    name: str
    block_paths: tuple[str, ...]  # candidate attribute paths of the ModuleList of blocks
    groups: Callable[[nn.Module], list[list[Site]]]
    run: Callable[[nn.Module, object], object]
    matches: Callable[[nn.Module], bool]
    #: which token positions of a batch are real (B, T) bool, or None when every position is (images); padded
    #: positions are left out of the calibration statistics
    token_mask: Callable[[object], object] = lambda batch: None

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        for path in self.block_paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            return [(f"{path}.{i}.", b) for i, b in enumerate(blocks)]
        raise EPMQError(f"adapter {self.name}: none of {self.block_paths} found in {type(model).__name__}")

    def find_linears(self, block: nn.Module) -> list[list[Site]]:
        return self.groups(block)


# ------------------------------------------------------------------ open_clip VisionTransformer


def _openclip_groups(block: nn.Module) -> list[list[Site]]:
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise EPMQError("open_clip block: expected nn.MultiheadAttention with a fused in_proj_weight")
    return [
        [Site("attn.in_proj_weight", attn, "in_proj_weight", "in_proj_bias", "mha_in", "attn_in")],
        [Site("attn.out_proj.weight", attn.out_proj, "weight", "bias", "mha_out", "attn_ctx")],
        [_linear(block, "mlp.c_fc", "mlp_in")],
        [_linear(block, "mlp.c_proj", "mlp_hidden")],
    ]


def _run_vision(model: nn.Module, batch):
    return model(batch)


def _is_openclip(model: nn.Module) -> bool:
    try:
        blocks = model.get_submodule("transformer.resblocks")
    except AttributeError:
        return False
    return len(blocks) > 0 and isinstance(getattr(blocks[0], "attn", None), nn.MultiheadAttention)


OPENCLIP_VIT = Adapter("openclip_vit", ("transformer.resblocks",), _openclip_groups, _run_vision, _is_openclip)


# ------------------------------------------------------------------ HF CLIP vision


def _hf_clip_groups(block: nn.Module) -> list[list[Site]]:
    return [
        [_linear(block, f"self_attn.{p}_proj", "attn_in") for p in ("q", "k", "v")],
        [_linear(block, "self_attn.out_proj", "attn_ctx")],
        [_linear(block, "mlp.fc1", "mlp_in")],
        [_linear(block, "mlp.fc2", "mlp_hidden")],
    ]


def _run_hf_vision(model: nn.Module, batch):
    return model(pixel_values=batch)


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


HF_CLIP_VISION = Adapter(
    "hf_clip_vision",
    ("vision_model.encoder.layers", "encoder.layers"),
    _hf_clip_groups,
    _run_hf_vision,
    lambda m: type(m).__name__.startswith("CLIPVision") and (_has(m, "vision_model.encoder.layers") or _has(m, "encoder.layers")),
)


# ------------------------------------------------------------------ HF BERT encoders


def _bert_groups(block: nn.Module) -> list[list[Site]]:
    return [
        [_linear(block, f"attention.self.{p}", "attn_in") for p in ("query", "key", "value")],
        [_linear(block, "attention.output.dense", "attn_ctx")],
        [_linear(block, "intermediate.dense", "mlp_in")],
        [_linear(block, "output.dense", "mlp_hidden")],
    ]


def _run_hf_text(model: nn.Module, batch):
    return model(**batch)


def _text_token_mask(batch):
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.bool()


HF_BERT = Adapter(
    "hf_bert",
    ("bert.encoder.layer", "encoder.layer"),
    _bert_groups,
    _run_hf_text,
    lambda m: (_has(m, "bert.encoder.layer") or _has(m, "encoder.layer")) and "Bert" in type(m).__name__,
    _text_token_mask,
)

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (OPENCLIP_VIT, HF_CLIP_VISION, HF_BERT)}


def get_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter called ``name``, or the one whose ``matches`` recognises ``model``."""
    if name is not None:
        if name not in ADAPTERS:
            raise EPMQError(f"adapter={name!r}: expected one of {sorted(ADAPTERS)}")
        return ADAPTERS[name]
    for a in ADAPTERS.values():
        if a.matches(model):
            return a
    raise EPMQError(f"no adapter recognises {type(model).__name__}; pass adapter= one of {sorted(ADAPTERS)}")
