"""Zero-shot classification heads: class names x prompt templates through a CLIP text tower.

:func:`zeroshot_head` is model-agnostic: it takes two callables, ``tokenize(list[str]) -> batch`` and
``encode_text(batch) -> Tensor[n, dim]``, so open_clip, transformers or a toy encoder all fit.
:func:`hf_clip_text_encoder` makes that pair for a transformers ``CLIPModel`` (or a folder holding one and its
tokenizer). :func:`cached_head` keeps a built head on disk as safetensors plus a JSON sidecar and rebuilds it
when the metadata that defines it (base model, task, prompt hash; see :func:`head_meta`) changes.

The logit scale is applied to the head: row ``c`` is ``logit_scale * normalize(mean_t normalize(e_{c,t}))``,
so ``logits = normalize(image_features) @ head.T``. Pass the *exponentiated* scale (CLIP stores its log:
``model.logit_scale.exp().item()``, 100 for the OpenAI checkpoints), or ``logit_scale=1.0`` for unit rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

from epmq.errors import EPMQError
from epmq.tasks.clip import ClipTask

HEAD_KEY = "head"
_META_KEY = "epmq_head_meta"


def zeroshot_head(encode_text, tokenize, task: ClipTask, *, logit_scale: float, batch_size: int = 256):
    """Zero-shot classifier weights ``[task.n_classes, dim]`` (float32, CPU), logit scale applied.

    For each class every template is filled in and encoded; each embedding is L2-normalised, the mean over
    templates is taken and L2-normalised again, then multiplied by ``logit_scale``. Prompts are encoded in
    chunks of ``batch_size``, under ``torch.no_grad()``.
    """
    import torch

    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not (
            math.isfinite(logit_scale) and logit_scale > 0):
        raise EPMQError(f"zeroshot_head({task.name}): logit_scale={logit_scale!r} must be a finite number > 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EPMQError(f"zeroshot_head({task.name}): batch_size={batch_size!r} must be a positive integer")
    n_cls, n_tpl = task.n_classes, len(task.templates)
    prompts = [p for c in task.classnames for p in task.prompts(c)]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            part = prompts[i:i + batch_size]
            emb = encode_text(tokenize(part))
            if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(part):
                got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise EPMQError(f"zeroshot_head({task.name}): encode_text returned {got} for {len(part)} prompts, "
                                f"expected a tensor [{len(part)}, dim]")
            chunks.append(emb.detach().float().cpu())
        emb = torch.cat(chunks).reshape(n_cls, n_tpl, -1)
        norms = emb.norm(dim=-1, keepdim=True)
        if not torch.isfinite(emb).all() or (norms == 0).any():
            raise EPMQError(f"zeroshot_head({task.name}): text embeddings hold NaN/Inf or all-zero rows")
        mean = (emb / norms).mean(dim=1)
        mnorm = mean.norm(dim=-1, keepdim=True)
        if (mnorm == 0).any():
            bad = task.classnames[int((mnorm[:, 0] == 0).nonzero()[0, 0])]
            raise EPMQError(f"zeroshot_head({task.name}): class {bad!r} has a zero mean prompt embedding")
        return (mean / mnorm * float(logit_scale)).contiguous()


def hf_clip_text_encoder(model_dir_or_model, *, tokenizer=None, device=None, max_length: int | None = None):
    """``(encode_text, tokenize)`` for a transformers ``CLIPModel`` (or ``CLIPTextModelWithProjection``).

    ``model_dir_or_model``: a local folder / hub id holding the model and its tokenizer, or a loaded model (then
    the tokenizer comes from ``tokenizer`` or from the model's ``name_or_path``). ``tokenize`` pads and
    truncates to ``max_length`` (default: the text config's ``max_position_embeddings``, 77 for CLIP);
    ``encode_text`` returns the projected text features ``[n, projection_dim]``. No remote code is run. The model
    is put in eval mode, and moved to ``device`` when one is given (a passed-in model is changed in place).
    """
    import torch
    import transformers

    if isinstance(model_dir_or_model, (str, Path)):
        src = str(model_dir_or_model)
        try:
            model = transformers.CLIPModel.from_pretrained(src)  # a concrete class: never runs remote code
        except (OSError, ValueError) as e:
            raise EPMQError(f"hf_clip_text_encoder: cannot load a CLIPModel from {src!r} ({e})") from e
    elif isinstance(model_dir_or_model, torch.nn.Module):
        model = model_dir_or_model
        src = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    else:
        raise EPMQError(f"hf_clip_text_encoder: expected a model folder or a CLIPModel, got "
                        f"{type(model_dir_or_model).__name__}")
    if not (hasattr(model, "get_text_features") or hasattr(model, "text_projection")):
        raise EPMQError(f"hf_clip_text_encoder: {type(model).__name__} has no CLIP text projection")
    if tokenizer is None:
        if not src:
            raise EPMQError("hf_clip_text_encoder: the model has no name_or_path; pass tokenizer=")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise EPMQError(f"hf_clip_text_encoder: cannot load a tokenizer from {src!r} ({e})") from e
    if max_length is None:
        cfg = getattr(model.config, "text_config", model.config)
        max_length = int(getattr(cfg, "max_position_embeddings", 77))
    model.eval()
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device

    def tokenize(texts):
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def encode_text(batch):
        batch = {k: v.to(dev) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            if hasattr(model, "get_text_features"):
                out = model.get_text_features(**batch)
                # transformers < 5 returns the projected tensor, >= 5 a ModelOutput whose pooler_output it is
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            return model(**batch).text_embeds  # CLIPTextModelWithProjection

    return encode_text, tokenize


def prompts_sha256(task: ClipTask) -> str:
    """Hash of a task's class names and templates (what a head is built from, besides the model)."""
    blob = json.dumps({"classnames": list(task.classnames), "templates": list(task.templates)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def head_meta(base_model: str, task: ClipTask, **extra) -> dict:
    """The metadata that identifies a zero-shot head: base model id, task name, prompt hash (+ ``extra``)."""
    return {"base_model": str(base_model), "task": task.name, "n_classes": task.n_classes,
            "prompts_sha256": prompts_sha256(task), **extra}


def _canonical(meta: dict, path: Path) -> str:
    if not isinstance(meta, dict):
        raise EPMQError(f"{path}: head metadata must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise EPMQError(f"{path}: head metadata is not JSON-serialisable ({e})") from e


def cached_head(path, build_fn, meta: dict):
    """Load the head stored at ``path`` (``*.safetensors``) if it was built for ``meta``; else build and store it.

    ``build_fn()`` returns the head tensor ``[n_classes, dim]``. The metadata is stored inside the safetensors
    file (the copy that decides reuse, so a head and its metadata can never disagree) and, for people, as
    ``<stem>.json`` beside it. Both files are written atomically.
    """
    from safetensors import safe_open

    from epmq.io import save_safetensors_atomic, write_json_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        raise EPMQError(f"cached_head: {path} must end in .safetensors")
    want = _canonical(meta, path)
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if (f.metadata() or {}).get(_META_KEY) == want and HEAD_KEY in names:
                    return f.get_tensor(HEAD_KEY)
        except Exception as e:  # noqa: BLE001 -- an unreadable or foreign cache file is rebuilt, never trusted
            warnings.warn(f"cached_head: {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    import torch

    head = build_fn()
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        got = tuple(head.shape) if isinstance(head, torch.Tensor) else type(head).__name__
        raise EPMQError(f"cached_head({path}): build_fn returned {got}, expected a 2-D tensor [n_classes, dim]")
    if not torch.isfinite(head).all():
        raise EPMQError(f"cached_head({path}): build_fn returned a head with NaN/Inf")
    save_safetensors_atomic(path, {HEAD_KEY: head}, metadata={_META_KEY: want})
    write_json_atomic(path.with_suffix(".json"), json.loads(want))
    return head.detach().contiguous().cpu()
