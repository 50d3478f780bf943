"""The layer-wise calibration engine: walk the blocks in forward order, capture every quantizable weight's
inputs with hooks (in the partially quantized model and in each expert), quantize in true-sequential groups,
and re-run the block to propagate.

Layout (data flows top to bottom):

=====================  ==================================================================================
``config.py``          :class:`QuantConfig` (every knob of a run), :class:`QuantizeReport` (what it did),
                       the precision knobs' tables :data:`DTYPE_KNOBS`
``quantize.py``        the two walks over the blocks: :func:`quantize_model` and :func:`collect_stats`
``runner.py``          the block runner ``Engine``: the calibration calls into the current block (``Streams``,
                       the model's and each expert's), expert passes, a group's statistics, propagation
``capture.py``         block calls (:class:`Call`) and the hooks that record inputs (:class:`Capture`,
                       :func:`capture_block_inputs`; ``nn.MultiheadAttention``'s fused in_proj and context)
``reuse.py``           ``Reuse``: a block's finished sub-modules are not recomputed by its later passes
``budget.py``          memory-for-speed budgets (``EXPERT_CACHE_MB``, ``REUSE_CACHE_MB``) and
                       :func:`cache_budget_mb` (environment variables ``EPMQ_<NAME>``)
``experts.py``         reading expert weights (modules or lazy state-dict mappings), a block at a time
``fold.py``            each task's statistics folded with its expert weight into one ``FoldedStats`` per site
(the quantizer)        what is done with a fold is the quantizer plug-in's (:mod:`epmq.quant.methods`):
                       ``cfg.spec.plan`` (target, Hessian) and ``cfg.spec.round_group`` (GPTQ with shared
                       Hessians, RTN, none; the layer log's diagnostics)
=====================  ==================================================================================

Per block of :func:`quantize_model`: (a later stack's inputs re-captured) -> the expert pass (each expert's
block run once, its sites' inputs kept) -> per true-sequential group: the model's block run per task with
:class:`Capture` hooks -> ``TaskStats`` -> folded (``fold.py``) -> planned and rounded (the quantizer's ``plan`` / ``round_group``) ->
written into the model -> after the last group the block is run once more to propagate.

Two propagation modes:

``sequential`` (default, faithful to GPTQ and METHOD.md section 3)
    The inputs X_t of a layer come from the model whose earlier layers are already quantized, so the
    statistics depend on the quantizer and the bit width: they are recomputed inside :func:`quantize_model`
    for every (method, bits, ...) and never shared. The calibrate-collect artefact then holds only what is
    quantizer-independent: the calibration batches themselves.

``fp``
    All statistics come from the full-precision merged model and the experts. They do not depend on the
    quantizer: :func:`collect_stats` computes them, and :func:`quantize_model` takes them as ``stats=``
    (computing them itself when not given).

Expert inputs always come from the expert's own blocks in full precision (the expert is never quantized).

Encoder-decoders (an adapter with several ``stacks``, T5): the blocks are walked stack after stack. At the
first block of a later stack (the decoder) its inputs are captured again by running the whole model -- the
one being quantized with its earlier stacks already quantized, and each expert with its full state -- so the
decoder's inputs, ``encoder_hidden_states`` included, come from the quantized encoder (sequential) or the
expert's own encoder. Padding is masked per stack (encoder tokens, decoder target positions) and per site
(cross-attention k/v read encoder positions).

Memory: statistics and hidden states are kept for the current block only; experts may be lazy state-dict
mappings (e.g. safetensors) and only one expert block is materialised at a time. ``act_dtype`` (bf16/fp16)
stores the propagated hidden states (``args[0]`` of every kept block call, the model's and each expert's) in
half precision between blocks, half their memory; they are cast back to float32 when a block runs on them,
and the statistics stay float32. Other tensors of a call (masks, position biases, T5's
``encoder_hidden_states``) are kept as they are.

Passes: a group's pass stops as soon as its inputs are captured, each expert block runs once per block
(``EXPERT_CACHE_MB``), and a sub-module whose sites are all quantized is not recomputed by the block's later
passes over the same calibration call (``Reuse``, ``REUSE_CACHE_MB``; validity tracked from the forward
order, bit-identical weights, tested): BERT's attention runs once for the FFN's two groups and the
propagation instead of three times (minilm GPTQ quantize 9.0 -> 6.9 s).

E-PMQ's target product ``[W_t b_t] C~_t`` of a layer with ``2 d_out <= d_in`` (an MLP's down projection:
``c_proj``, BERT's ``output.dense``, T5's ``wo``) is accumulated token by token from the expert's outputs on
the captured inputs (``TaskStats(direct=...)``, :func:`epmq.quant.target.direct_pays`) instead of collecting
``C_t`` and folding it with a float64 ``d_out x d_in^2`` product per task: ``2 n d_out d_in`` flops against
``n d_in^2 + d_out d_in^2``, the same numbers up to float32 summation order (tested). The per-block expert
cache then keeps those layers' expert outputs instead of their inputs (``d_out`` numbers a token instead of
``d_in``; same bits, tested). GPTQ's fold keeps only the pooled Gram (``FoldedStats(pooled_only=True)``).

Precision: ``forward_dtype`` runs the block forwards under autocast; ``stats_dtype="bf16"`` rounds the captured
layer inputs to bf16 before the Gram products ``G``/``C`` (:func:`epmq.precision.add_gram`), which are still
accumulated and kept in float32 -- on CPUs with bf16 matmul hardware the statistics update is 1.2-2.0x faster
(``bench/grams_bench.py``); on CUDA the products run as TF32 GEMMs, exact on bf16 values (not yet timed).

Public names (``import epmq.engine`` itself imports no torch; each name loads its module on first use):
:class:`QuantConfig`, :class:`QuantizeReport`, :func:`quantize_model`, :func:`collect_stats`,
:func:`cache_budget_mb`, :data:`DTYPE_KNOBS`, and for code that runs blocks itself (the benchmark's
reference GPTQ loop): :class:`Call`, :class:`Capture`, :func:`capture_block_inputs`, :func:`run_block`,
:func:`link_mha_parents`. The budgets' constants live in :mod:`epmq.engine.budget` (patch them there).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "QuantConfig": "config",
    "QuantizeReport": "config",
    "DTYPE_KNOBS": "config",
    "quantize_model": "quantize",
    "collect_stats": "quantize",
    "cache_budget_mb": "budget",
    "Call": "capture",
    "Capture": "capture",
    "capture_block_inputs": "capture",
    "run_block": "capture",
    "link_mha_parents": "capture",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):  # lazy: keep `import epmq.engine` free of torch
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"epmq.engine.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'epmq.engine' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
