"""State-dict conversions between model libraries.

* :func:`hf_to_openclip_visual` turns a transformers CLIP vision tower (the canonical flat keys of
  :func:`epmq.models.sources.clip_vision_keys`) plus the CLIP model's ``visual_projection.weight`` into the
  state dict of open_clip's ``VisionTransformer``: q/k/v fused into ``attn.in_proj_*``, ``fc1``/``fc2`` renamed
  ``c_fc``/``c_proj``, and ``proj = visual_projection.T``. OpenAI's CLIP weights are the same in both libraries,
  so the converted tower computes the HF tower's projected image features.
* :func:`openclip_config_from_hf` gives the open_clip model config (``embed_dim``, ``vision_cfg``,
  ``quick_gelu``) of a transformers ``CLIPVisionConfig``, for :func:`epmq.models.sources.build_openclip_visual`.

The ``clip`` suite (:mod:`epmq.suites.clip`, ``layout="open_clip"``) converts its HF base and HF experts with
them. torch is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from epmq.errors import EPMQError


def openclip_config_from_hf(vision_config, projection_dim: int) -> dict:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``quick_gelu``) equal to a HF vision config."""
    c = vision_config
    return {"embed_dim": int(projection_dim), "quick_gelu": c.hidden_act == "quick_gelu",
            "vision_cfg": {"image_size": int(c.image_size), "patch_size": int(c.patch_size),
                           "width": int(c.hidden_size), "layers": int(c.num_hidden_layers),
                           "head_width": int(c.hidden_size // c.num_attention_heads),
                           "mlp_ratio": c.intermediate_size / c.hidden_size}}


def hf_to_openclip_visual(sd: Mapping, projection) -> dict:
    """A HF CLIP vision state dict (canonical flat keys) + ``visual_projection.weight`` -> open_clip
    ``VisionTransformer`` keys (q/k/v fused into ``in_proj``; ``proj = projection.T``). A state dict with other
    keys than a HF vision tower's is refused with one error naming some of them."""
    import torch

    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    want = hf_vision_keys(len(layers))
    extra, absent = sorted(set(sd) - set(want)), [k for k in want if k not in sd]
    if extra or absent:
        raise EPMQError(f"HF CLIP vision state dict: not convertible to open_clip (unexpected {extra[:3]}, "
                        f"missing {absent[:3]})")
    out = {"conv1.weight": sd["embeddings.patch_embedding.weight"],
           "class_embedding": sd["embeddings.class_embedding"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_pre.weight": sd["pre_layrnorm.weight"], "ln_pre.bias": sd["pre_layrnorm.bias"],
           "ln_post.weight": sd["post_layernorm.weight"], "ln_post.bias": sd["post_layernorm.bias"],
           "proj": projection.t().contiguous()}
    for i in layers:
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{o}{b}.{p}"] = sd[f"{h}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{o}attn.in_proj_{p}"] = torch.cat([sd[f"{h}self_attn.{q}_proj.{p}"] for q in "qkv"])
    return out


def hf_vision_keys(n_layers: int) -> list[str]:
    """The canonical flat keys of a HF CLIP vision tower with ``n_layers`` encoder layers, in order."""
    keys = ["embeddings.patch_embedding.weight", "embeddings.class_embedding", "embeddings.position_embedding.weight",
            "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias"]
    for i in range(n_layers):
        for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"encoder.layers.{i}.{m}.weight", f"encoder.layers.{i}.{m}.bias"]
    return keys
