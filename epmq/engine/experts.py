"""Reading the experts' weights: an expert is a module or a (possibly lazy, e.g. safetensors) state-dict
mapping with the merged model's keys; the engine loads one block of it at a time (:func:`load_from`) and
reads single weights for the target fold (:func:`expert_weight`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from epmq.errors import EPMQError
from epmq.models.adapters import Site

__all__ = ["expert_weight", "load_from", "state_dict_of"]


def state_dict_of(expert) -> Mapping[str, torch.Tensor]:
    """An expert as a state-dict mapping (a module's ``state_dict()``; a mapping as it is, not read)."""
    return expert.state_dict() if isinstance(expert, nn.Module) else expert


def load_from(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str, who: str,
              skip: tuple[str, ...] = ()) -> None:
    """Copy ``sd[prefix + name]`` into every parameter and buffer of ``module`` (names starting with one of
    ``skip`` left as they are)."""
    seen: set[int] = set()
    with torch.no_grad():
        for k, p in module.state_dict(keep_vars=True).items():
            key = prefix + k
            if id(p) in seen or (skip and key.startswith(skip)):
                continue  # a tied weight (T5's embed_tokens = shared) is loaded under its first name
            seen.add(id(p))
            try:
                src = sd[key]
            except KeyError:
                raise EPMQError(f"{who}: missing key {key!r}") from None
            if tuple(src.shape) != tuple(p.shape):
                raise EPMQError(f"{who}: {key!r} has shape {tuple(src.shape)}, the model expects {tuple(p.shape)}")
            p.data.copy_(src.to(p.device, p.dtype))


def expert_weight(experts: list[Mapping[str, torch.Tensor]], t: int, prefix: str, site: Site, device):
    """Expert ``t``'s weight and bias (None for a bias-free site) of ``site`` (state-dict prefix ``prefix``),
    on ``device``; a clear error for a missing key or a shape other than the merged model's."""
    sd = experts[t]
    key = prefix + site.name
    try:
        W = sd[key]
    except KeyError:
        raise EPMQError(f"expert {t}: missing key {key!r}") from None
    if tuple(W.shape) != tuple(site.weight.shape):
        raise EPMQError(f"expert {t}: {key!r} has shape {tuple(W.shape)}, merged has {tuple(site.weight.shape)}")
    b = None
    if site.bias_name is not None:
        b = sd[prefix + site.bias_name].to(device)
    return W.to(device), b
