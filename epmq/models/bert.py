"""A small BERT encoder (no pooler) that is bit-identical to transformers' ``BertModel(config,
add_pooling_layer=False)`` with its default ``sdpa`` attention, without importing transformers (importing
``transformers.models.bert`` costs ~2.8 s per process).

* **State dict**: the same keys and shapes as ``BertModel(add_pooling_layer=False)`` --
  ``embeddings.{word,position,token_type}_embeddings.weight``, ``embeddings.LayerNorm.*``,
  ``encoder.layer.N.attention.self.{query,key,value}.*``, ``encoder.layer.N.attention.output.{dense,LayerNorm}.*``,
  ``encoder.layer.N.intermediate.dense.*``, ``encoder.layer.N.output.{dense,LayerNorm}.*`` -- so its safetensors
  checkpoints load unchanged. ``embeddings.position_ids`` is a non-persistent buffer, as in transformers.
* **Forward**: the same torch ops in the same order (checked against transformers 5.x): word + token-type, then
  + position embeddings, LayerNorm, dropout; per layer q/k/v Linears viewed as heads, one
  ``F.scaled_dot_product_attention`` with transformers' padding mask (a (B, 1, T, T) bool tensor, or None when
  no position is padded), dense + dropout + LayerNorm(residual), dense + exact (erf) GELU, dense + dropout +
  LayerNorm(residual). Dropout (and attention dropout) only in train mode. So outputs and gradients are the same
  bits, in fp32 and under autocast (``tests/test_bert.py``).
* **Initialisation**: the same draws from the global RNG as transformers' constructor (torch's default init of
  each ``nn.Linear`` / ``nn.Embedding``, then ``normal_(0, initializer_range)`` weights, zero biases, a zero
  padding row), so ``torch.manual_seed(s)`` + construction leaves the same weights *and* the same RNG state:
  dropout masks drawn afterwards (expert fine-tuning) match a run with transformers' ``BertModel``.
* **Engine**: the top class's name contains ``Bert`` and its blocks are ``encoder.layer`` (the ``hf_bert``
  adapter of :mod:`epmq.models.adapters`); a block is called ``layer(hidden_states, attention_mask)``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from epmq.errors import EPMQError


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The ``config.json`` fields this encoder uses (defaults: transformers' ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0

    #: settings of a transformers config this encoder does not implement, with the only value it supports
    UNSUPPORTED = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
                   "add_cross_attention": False, "chunk_size_feed_forward": 0}

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> "BertConfig":
        for k, ok in cls.UNSUPPORTED.items():
            if k in d and d[k] != ok:
                raise EPMQError(f"{where}: {k}={d[k]!r} is not supported by epmq.models.bert (only {ok!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise EPMQError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of "
                            f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        """From a ``config.json`` file, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EPMQError(f"{path}: cannot read a BERT config.json ({e})") from None
        return cls.from_dict(d, where=str(path))


class BertEncoderOutput(NamedTuple):
    """What :class:`BertEncoderModel` returns (``out.last_hidden_state`` or ``out[0]``: (B, T, hidden))."""

    last_hidden_state: torch.Tensor


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_length = input_ids.shape[1]
        position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_attention_heads = cfg.num_attention_heads
        self.attention_head_size = int(cfg.hidden_size / cfg.num_attention_heads)
        all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        self.query = nn.Linear(cfg.hidden_size, all_head_size)
        self.key = nn.Linear(cfg.hidden_size, all_head_size)
        self.value = nn.Linear(cfg.hidden_size, all_head_size)
        self.dropout_p = float(cfg.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(*hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.scaling, is_causal=False)
        out = out.transpose(1, 2).contiguous()
        return out.reshape(*input_shape, -1).contiguous()


class BertSelfOutput(nn.Module):
    """``dense`` + dropout + LayerNorm(+ residual); also the layer's ``output`` (``BertOutput``)."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))  # exact (erf) GELU: transformers' "gelu"


class BertLayer(nn.Module):
    """One block: ``layer(hidden_states, attention_mask)`` -> hidden states (a tensor)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


def attention_mask_4d(attention_mask: torch.Tensor | None, q_length: int, device) -> torch.Tensor | None:
    """transformers' SDPA mask for a bidirectional encoder: None when there is no mask or no position is
    padded, else a contiguous (B, 1, q_length, T) bool tensor, True where a key is a real token. A 4-D mask is
    used as given."""
    if attention_mask is None or attention_mask.ndim == 4:
        return attention_mask
    padding = attention_mask.to(device=device, dtype=torch.bool)
    if padding.all():
        return None
    q_valid = torch.arange(q_length, device=device) >= 0
    return q_valid[None, None, :, None] & padding[:, None, None, :]


class BertEncoderModel(nn.Module):
    """BERT without pooler: ``model(input_ids, attention_mask=None, token_type_ids=None)`` ->
    :class:`BertEncoderOutput`. See the module docstring for what is the same as transformers' ``BertModel``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise EPMQError(f"BertEncoderModel: expected an epmq.models.bert.BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers' ``BertPreTrainedModel`` init, drawing from the global RNG in the same order (its
        Linears and Embeddings in registration order; norms and biases draw nothing)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.padding_idx is not None:
                    nn.init.zeros_(m.weight[m.padding_idx])
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertEncoderOutput:
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask_4d(attention_mask, hidden.shape[1], hidden.device)
        return BertEncoderOutput(self.encoder(hidden, mask))
