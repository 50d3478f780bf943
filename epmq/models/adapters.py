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

Most models are one chain of blocks. An encoder-decoder (T5) is several: an adapter with ``stacks`` lists them
in forward order (:class:`Stack`: the encoder's blocks, then the decoder's), and the engine captures the
inputs of each stack's first block by running the whole (already partially quantized) model, so a decoder
sees the quantized encoder's output. ``advance`` says how one block's output becomes the next block's call
when more than the hidden state travels (T5's position biases, computed by the first block of a stack).
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
    input (q/k/v), so their statistics are computed once; ``tokens``: which token mask selects the real rows
    of its input -- None for the block's own positions, else the name of another mask of the stack
    (:attr:`Stack.masks`; T5's cross-attention k/v read the encoder output: ``"encoder"``).
    """

    name: str
    owner: nn.Module
    weight_attr: str
    bias_attr: str | None
    kind: str  # "linear" | "mha_in" | "mha_out"
    input_key: str
    tokens: str | None = None

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


def _linear(block: nn.Module, path: str, input_key: str, tokens: str | None = None) -> Site:
    mod = block.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise EPMQError(f"{path}: expected nn.Linear, found {type(mod).__name__}")
    return Site(f"{path}.weight", mod, "weight", "bias", "linear", input_key, tokens)


def _no_masks(batch) -> dict:
    return {}


@dataclass
class Stack:
    """One chain of blocks of a multi-stack model: the attribute path of its ModuleList, the real positions of
    its hidden state in a batch ((B, T) bool or None) and further named masks its sites may select
    (:attr:`Site.tokens`)."""

    path: str
    token_mask: Callable[[object], object] = lambda batch: None
    masks: Callable[[object], dict] = _no_masks


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
    #: several chains of blocks in forward order (empty: one chain, found with ``block_paths``)
    stacks: tuple[Stack, ...] = ()
    #: ``(args, kwargs, output) -> (args, kwargs)``: the next block's call from this block's call and output
    #: (None: only the hidden state, ``args[0]``, changes: it becomes the output or its first element)
    advance: Callable[[tuple, dict, object], tuple[tuple, dict]] | None = None

    def find_stacks(self, model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
        """The blocks of each stack, in forward order, with their state-dict prefixes."""
        if not self.stacks:
            return [self.find_blocks(model)]
        out = []
        for st in self.stacks:
            try:
                blocks = model.get_submodule(st.path)
            except AttributeError:
                raise EPMQError(f"adapter {self.name}: no {st.path!r} in {type(model).__name__}") from None
            if len(blocks) == 0:
                raise EPMQError(f"adapter {self.name}: {st.path!r} of {type(model).__name__} has no blocks")
            out.append([(f"{st.path}.{i}.", b) for i, b in enumerate(blocks)])
        return out

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.stacks:
            return [b for stack in self.find_stacks(model) for b in stack]
        for path in self.block_paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            return [(f"{path}.{i}.", b) for i, b in enumerate(blocks)]
        raise EPMQError(f"adapter {self.name}: none of {self.block_paths} found in {type(model).__name__}")

    def stack_masks(self, batch, stack: int = 0) -> tuple[object, dict | None]:
        """(real positions of stack ``stack``'s hidden state, its other named masks or None) for ``batch``."""
        if not self.stacks:
            return self.token_mask(batch), None
        st = self.stacks[stack]
        return st.token_mask(batch), dict(st.masks(batch))

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

# ------------------------------------------------------------------ HF T5 (encoder-decoder)

T5_IGNORE_INDEX = -100  # label padding (positions without a target)


def _t5_groups(block: nn.Module) -> list[list[Site]]:
    """encoder: [q,k,v] -> [o] -> [wi | wi_0,wi_1] -> [wo]; decoder: self-attention [q,k,v] -> [o] -> cross-attention
    [q | k,v] (q reads the decoder state, k/v the encoder output: two input keys, one block re-run) -> [o] -> FFN."""
    sa = "layer.0.SelfAttention"
    groups = [[_linear(block, f"{sa}.{p}", "attn_in") for p in "qkv"], [_linear(block, f"{sa}.o", "attn_ctx")]]
    if getattr(block, "is_decoder", False):
        ca = "layer.1.EncDecAttention"
        groups.append([_linear(block, f"{ca}.q", "cross_q"), _linear(block, f"{ca}.k", "cross_kv", "encoder"),
                       _linear(block, f"{ca}.v", "cross_kv", "encoder")])
        groups.append([_linear(block, f"{ca}.o", "cross_ctx")])
    ff = f"layer.{len(block.layer) - 1}.DenseReluDense"
    dense = block.get_submodule(ff)
    if hasattr(dense, "wi_0"):  # gated FFN (T5 v1.1 / FLAN-T5): both read the same input
        groups.append([_linear(block, f"{ff}.wi_0", "mlp_in"), _linear(block, f"{ff}.wi_1", "mlp_in")])
    else:
        groups.append([_linear(block, f"{ff}.wi", "mlp_in")])
    groups.append([_linear(block, f"{ff}.wo", "mlp_hidden")])
    return groups


def t5_decoder_input_ids(model: nn.Module, labels):
    """Teacher forcing: the labels shifted right behind ``decoder_start_token_id``, ignored positions as padding
    (what ``T5ForConditionalGeneration`` does with ``labels``)."""
    import torch

    cfg = model.config
    start, pad = cfg.decoder_start_token_id, cfg.pad_token_id
    if start is None or pad is None:
        raise EPMQError("T5 config: decoder_start_token_id and pad_token_id are needed for teacher forcing")
    out = torch.full_like(labels, int(start))
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == T5_IGNORE_INDEX, int(pad))


def _run_t5(model: nn.Module, batch):
    """A teacher-forced forward: ``batch`` = ``{"input_ids", "attention_mask", "labels"}`` (labels padded with
    -100); no cache, so every block computes its own (cross-)attention keys and values."""
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        raise EPMQError("T5 calibration batch: expected a dict with input_ids, attention_mask and labels")
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 decoder_input_ids=t5_decoder_input_ids(model, batch["labels"]), use_cache=False)


def _t5_decoder_tokens(batch):
    return batch["labels"] != T5_IGNORE_INDEX  # the positions a target token is predicted at


def _t5_encoder_masks(batch) -> dict:
    mask = _text_token_mask(batch)
    return {} if mask is None else {"encoder": mask}


def _t5_advance(args: tuple, kwargs: dict, out) -> tuple[tuple, dict]:
    """The next T5 block's call: the new hidden state, and the position biases the first block of a stack
    computed (transformers >= 5: ``T5Block`` returns ``(hidden, self_attn_bias, cross_attn_bias)``)."""
    if not (isinstance(out, tuple) and len(out) == 3):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise EPMQError(f"T5 block returned {got}; the t5 adapter expects transformers >= 5's (hidden, "
                        "position_bias, cross_position_bias)")
    args, kwargs = list(args), dict(kwargs)

    def put(pos, name, value):
        if name in kwargs or len(args) <= pos:
            kwargs[name] = value
        else:
            args[pos] = value

    args[0] = out[0]
    put(2, "position_bias", out[1])
    if out[2] is not None:
        put(5, "encoder_decoder_position_bias", out[2])
    return tuple(args), kwargs


def _is_t5(model: nn.Module) -> bool:
    return "T5" in type(model).__name__ and _has(model, "encoder.block") and _has(model, "decoder.block")


HF_T5 = Adapter(
    "t5",
    ("encoder.block", "decoder.block"),
    _t5_groups,
    _run_t5,
    _is_t5,
    _text_token_mask,
    stacks=(Stack("encoder.block", _text_token_mask),
            Stack("decoder.block", _t5_decoder_tokens, _t5_encoder_masks)),
    advance=_t5_advance,
)

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (OPENCLIP_VIT, HF_CLIP_VISION, HF_BERT, HF_T5)}


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
