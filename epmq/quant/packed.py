"""Packed low-bit checkpoints: bit-packed codes, dequantize-on-the-fly modules, safetensors save/load.

Packing (``pack_codes`` / ``unpack_codes``)
    Every row of an integer code matrix (rows x cols, codes in [0, 2**bits - 1], any bits in 2..8) is written
    as one **row-wise little-endian bit stream, least significant bit first**: code ``j`` of a row occupies
    stream bits ``[j*bits, (j+1)*bits)`` with its LSB first, and stream bit ``k`` is bit ``k % 8`` (value
    ``1 << (k % 8)``) of byte ``k // 8``.  Each row is zero-padded to a whole byte, so a row takes
    ``ceil(cols*bits/8)`` bytes and the packed tensor is ``uint8`` of shape ``(rows, ceil(cols*bits/8))``.
    For bits in {2, 4, 8} this is the familiar layout "code j in bits ``(j % (8/bits))*bits`` of byte
    ``j // (8/bits)``".  Pure torch: works on any device.

Dequantization
    ``W = scales[:, g_idx] * (codes - zeros[:, g_idx])`` computed in float32 -- the same expression (same
    float32 operations, same order) as :meth:`QuantResult.dequantize` and the quantizers' fake-quant
    ``weight``, so a loaded model is bit-exact to the fake-quant model.  ``QuantLinear`` casts ``W`` to the
    input dtype; the parametrization casts it to the dtype the replaced parameter had (it follows
    ``model.half()`` etc.).  ``scales`` (and non-integer ``zeros``) stay float32 through ``.half()`` /
    ``.to(dtype)``.

Modules
    * plain ``nn.Linear`` (exact type) -> replaced by :class:`QuantLinear`;
    * any other 2-D parameter (``nn.MultiheadAttention.in_proj_weight``, ``attn.out_proj.weight`` which
      ``F.multi_head_attention_forward`` reads directly, Linear subclasses, custom modules) -> the Parameter is
      replaced by a ``torch.nn.utils.parametrize`` parametrization (:class:`PackedParam`) holding the packed
      buffers, so ``module.<name>`` is a dequantized tensor on every access (MHA's fast path included).
      Within one forward of the owning module (or of the enclosing ``nn.MultiheadAttention`` for its
      ``out_proj``) the dequantized tensor is computed once and reused, then dropped.

Checkpoint directory (``save_quantized`` / ``load_quantized``)
    ``model.safetensors``: for each quantized parameter ``<name>.qweight`` (uint8), ``<name>.scales``
    (float32), ``<name>.zeros`` (uint8, float32 only if a zero point is not an integer in [0, 255]),
    ``<name>.g_idx`` (int32), ``<name>.perm`` (int64, only with act-order); refitted biases (float32) under
    the model's bias key; every other ``model.state_dict()`` tensor as is.  ``quant_config.json``: format and
    version, packing description, per-parameter grid, the user's ``config``.  Both are written atomically.
    Loading uses ``safetensors.torch.load_file`` only (never pickle).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from epmq.errors import EPMQError, check_bits
from epmq.io import atomic_path, read_safetensors_header, write_text_atomic
from epmq.quant.result import QuantResult

FORMAT_NAME = "epmq-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
BIT_ORDER = "lsb_first"
PACKING_DOC = (
    "row-wise bit stream: code j of a row occupies stream bits [j*bits, (j+1)*bits), least significant bit "
    "first; stream bit k is bit k%8 (value 1<<(k%8)) of byte k//8; each row zero-padded to a whole byte; "
    "qweight is uint8 (rows, ceil(cols*bits/8))"
)
DEQUANT_DOC = "float32: scales[:, g_idx] * (codes - zeros[:, g_idx])"
SUFFIXES = ("qweight", "scales", "zeros", "g_idx", "perm")

# intermediate bit tensors are processed in row chunks of at most this many elements
_CHUNK_ELEMS = 1 << 26


# ----------------------------------------------------------------------------------------------- packing


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(cols * bits / 8)``."""
    return (cols * bits + 7) // 8


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def pack_codes(codes: torch.Tensor, bits: int, *, name: str = "codes") -> torch.Tensor:
    """Bit-pack integer codes (rows, cols) in [0, 2**bits - 1] into uint8 (rows, ceil(cols*bits/8)).

    Bit order: see the module docstring (row-wise LSB-first bit stream, rows padded to a byte).  Float
    tensors are accepted when they hold integers (the grid functions return float codes).
    """
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise EPMQError(f"{name}: expected a 2-D tensor of integer codes, got {_describe(codes)}")
    if codes.dtype == torch.bool or codes.is_complex():
        raise EPMQError(f"{name}: dtype {codes.dtype} is not an integer code dtype")
    maxq = 2**bits - 1
    if codes.is_floating_point():
        if not torch.isfinite(codes).all() or not torch.equal(codes, torch.round(codes)):
            raise EPMQError(f"{name}: floating-point codes must hold finite integers")
    if codes.numel():
        bad = (codes < 0) | (codes > maxq)
        if bad.any():
            n_bad = int(bad.sum())
            raise EPMQError(
                f"{name}: {n_bad} code(s) outside [0, {maxq}] for bits={bits} "
                f"(min {codes.min().item()}, max {codes.max().item()})"
            )
    c = codes.to(torch.uint8)
    rows, cols = c.shape
    nbytes = packed_row_bytes(cols, bits)
    out = torch.empty(rows, nbytes, dtype=torch.uint8, device=c.device)
    if rows == 0 or nbytes == 0:
        return out
    if 8 % bits == 0:  # 2, 4, 8 bits: codes never straddle bytes
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=c.device)
        pad = nbytes * per - cols
        for r0, r1 in _row_chunks(rows, nbytes * per):
            blk = c[r0:r1]
            if pad:
                blk = torch.cat([blk, blk.new_zeros(r1 - r0, pad)], dim=1)
            out[r0:r1] = (blk.view(r1 - r0, nbytes, per) << shifts).sum(-1, dtype=torch.uint8)
        return out
    # 3, 5, 6, 7 bits: 8 codes make exactly `bits` bytes; build each 8-code word (8*bits <= 56 bits) in int64
    n8 = -(-cols // 8)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=c.device)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=c.device)
    pad = n8 * 8 - cols
    for r0, r1 in _row_chunks(rows, n8 * 8 * 8):
        n = r1 - r0
        blk = c[r0:r1].to(torch.int64)
        if pad:
            blk = torch.cat([blk, blk.new_zeros(n, pad)], dim=1)
        words = (blk.view(n, n8, 8) << code_shifts).sum(-1)  # disjoint bits: sum == or
        out[r0:r1] = ((words.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).view(n, n8 * bits)[:, :nbytes]
    return out


def unpack_codes(packed: torch.Tensor, bits: int, cols: int, *, name: str = "qweight") -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 (rows, ceil(cols*bits/8)) -> uint8 codes (rows, cols)."""
    check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise EPMQError(f"{name}: expected a 2-D uint8 packed tensor, got {_describe(packed)}")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise EPMQError(f"{name}: cols={cols!r} must be a non-negative integer")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(cols, bits):
        raise EPMQError(
            f"{name}: packed rows have {nbytes} bytes, expected ceil({cols}*{bits}/8) = "
            f"{packed_row_bytes(cols, bits)} for {cols} columns at {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    if rows == 0 or cols == 0:
        return out
    if 8 % bits == 0:
        per = 8 // bits
        maxq = 2**bits - 1
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        for r0, r1 in _row_chunks(rows, nbytes * per):
            vals = (packed[r0:r1].unsqueeze(-1) >> shifts) & maxq
            out[r0:r1] = vals.reshape(r1 - r0, nbytes * per)[:, :cols]
        return out
    n8 = -(-cols // 8)
    maxq = 2**bits - 1
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    pad = n8 * bits - nbytes
    for r0, r1 in _row_chunks(rows, n8 * 8 * 8):
        n = r1 - r0
        blk = packed[r0:r1].to(torch.int64)
        if pad:
            blk = torch.cat([blk, blk.new_zeros(n, pad)], dim=1)
        words = (blk.view(n, n8, bits) << byte_shifts).sum(-1)
        out[r0:r1] = ((words.unsqueeze(-1) >> code_shifts) & maxq).to(torch.uint8).view(n, n8 * 8)[:, :cols]
    return out


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int, cols: int
) -> torch.Tensor:
    """float32 ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` -- bit-exact to ``QuantResult.weight``."""
    codes = unpack_codes(qweight, bits, cols)
    g = g_idx.long()
    return scales[:, g] * (codes.float() - zeros.float()[:, g])


# ------------------------------------------------------------------------------------ validation helpers


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor {t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__


def _zeros_to_storage(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points as uint8 codes when they are integers in [0, 255], else float32."""
    z = zeros.float()
    if (
        torch.isfinite(z).all()
        and torch.equal(z, torch.round(z))
        and (z.numel() == 0 or (z.min() >= 0 and z.max() <= 255))
    ):
        return z.to(torch.uint8)
    return z.contiguous()


def _validate_packed(
    name: str,
    *,
    qweight,
    scales,
    zeros,
    g_idx,
    perm,
    rows: int,
    cols: int,
    bits: int,
    n_groups: int | None = None,
) -> None:
    """Check dtypes, shapes and index ranges of one packed weight; ``name`` prefixes the key in messages."""
    check_bits(bits, name=f"{name}: bits")
    exp_q = (rows, packed_row_bytes(cols, bits))
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or tuple(qweight.shape) != exp_q:
        raise EPMQError(
            f"{name}.qweight: expected uint8 of shape {exp_q} ({rows} rows x ceil({cols} cols * {bits} bits / 8)), "
            f"got {_describe(qweight)}"
        )
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype != torch.float32
        or scales.dim() != 2
        or scales.shape[0] != rows
    ):
        raise EPMQError(f"{name}.scales: expected float32 of shape ({rows}, n_groups), got {_describe(scales)}")
    G = scales.shape[1]
    if n_groups is not None and G != n_groups:
        raise EPMQError(f"{name}.scales: {G} groups, expected {n_groups}")
    if G < 1:
        raise EPMQError(f"{name}.scales: has no groups")
    if not torch.isfinite(scales).all():
        raise EPMQError(f"{name}.scales: holds non-finite values")
    if (
        not isinstance(zeros, torch.Tensor)
        or zeros.dtype not in (torch.uint8, torch.float32)
        or tuple(zeros.shape) != (rows, G)
    ):
        raise EPMQError(f"{name}.zeros: expected uint8 (or float32) of shape {(rows, G)}, got {_describe(zeros)}")
    if zeros.dtype == torch.float32 and not torch.isfinite(zeros).all():
        raise EPMQError(f"{name}.zeros: holds non-finite values")
    if not isinstance(g_idx, torch.Tensor) or g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (cols,):
        raise EPMQError(f"{name}.g_idx: expected int32 of shape ({cols},), got {_describe(g_idx)}")
    if cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise EPMQError(
            f"{name}.g_idx: group indices must lie in [0, {G - 1}] (got [{int(g_idx.min())}, {int(g_idx.max())}])"
        )
    if perm is not None:
        if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (cols,):
            raise EPMQError(f"{name}.perm: expected int64 of shape ({cols},), got {_describe(perm)}")
        if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(cols)):
            raise EPMQError(f"{name}.perm: is not a permutation of range({cols})")


def _pack_result(name: str, result: QuantResult, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """QuantResult -> {'qweight','scales','zeros','g_idx'[, 'perm']} (CPU-agnostic), checked bit-exact."""
    if not isinstance(result, QuantResult):
        raise EPMQError(f"{name}: expected a QuantResult, got {type(result).__name__}")
    check_bits(result.bits, name=f"{name}: bits")
    w = result.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise EPMQError(f"{name}: result.weight must be a 2-D tensor, got {_describe(w)}")
    rows, cols = w.shape
    if not isinstance(result.codes, torch.Tensor) or tuple(result.codes.shape) != (rows, cols):
        raise EPMQError(f"{name}: result.codes shape {_describe(result.codes)} does not match weight {(rows, cols)}")
    scales = result.scales
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
        raise EPMQError(f"{name}: result.scales must be a float tensor, got {_describe(scales)}")
    scales = scales.to(torch.float32).contiguous()
    zeros = result.zeros
    if not isinstance(zeros, torch.Tensor):
        raise EPMQError(f"{name}: result.zeros must be a tensor, got {_describe(zeros)}")
    zeros = _zeros_to_storage(zeros)
    if not isinstance(result.g_idx, torch.Tensor) or result.g_idx.is_floating_point():
        raise EPMQError(f"{name}: result.g_idx must be an integer tensor, got {_describe(result.g_idx)}")
    g_idx = result.g_idx.to(torch.int32).contiguous()
    perm = None if result.perm is None else result.perm.to(torch.int64).contiguous()
    qweight = pack_codes(result.codes, result.bits, name=f"{name}.codes")
    packed = {"qweight": qweight, "scales": scales, "zeros": zeros, "g_idx": g_idx}
    if perm is not None:
        packed["perm"] = perm
    _validate_packed(
        name,
        rows=rows,
        cols=cols,
        bits=result.bits,
        perm=perm,
        **{k: packed[k] for k in ("qweight", "scales", "zeros", "g_idx")},
    )
    if verify:
        deq = dequantize_packed(qweight, scales, zeros, g_idx, result.bits, cols)
        ref = w.to(device=deq.device)
        if ref.dtype != torch.float32 or not torch.equal(deq, ref):
            diff = (deq - ref.float()).abs().max().item() if ref.is_floating_point() else float("nan")
            raise EPMQError(
                f"{name}: result.weight ({ref.dtype}) is not bit-exact to {DEQUANT_DOC} "
                f"(max |diff| {diff:.3g}); the packed checkpoint would not reproduce the fake-quant model"
            )
    return packed


# -------------------------------------------------------------------------------------------- modules


class _Float32BuffersMixin:
    """Keep the named float32 buffers float32 through ``.half()`` / ``.to(dtype)`` (device moves still apply)."""

    _keep_float32: tuple[str, ...] = ("scales", "zeros")

    def _apply(self, fn, recurse=True):
        saved = {k: self._buffers[k] for k in self._keep_float32 if self._buffers.get(k) is not None}
        out = super()._apply(fn, recurse)
        for k, t in saved.items():
            moved = self._buffers[k]
            if moved is not None and moved.dtype != t.dtype:
                self._buffers[k] = t.to(device=moved.device)
        self._drop_cache()
        return out

    def _drop_cache(self):
        self._cache = None


class QuantLinear(_Float32BuffersMixin, nn.Module):
    """A Linear layer whose weight is stored bit-packed and dequantized on every forward.

    Buffers: ``qweight`` uint8 (out, ceil(in*bits/8)), ``scales`` float32 (out, n_groups), ``zeros`` uint8
    (or float32) (out, n_groups), ``g_idx`` int32 (in,), optional ``perm`` int64 (in,) (provenance only);
    optional ``bias`` Parameter.  ``forward`` computes the float32 weight, casts it to ``x.dtype`` and calls
    ``F.linear``; nothing is cached unless ``cache_weight=True``.  ``.weight`` returns the dequantized weight
    in the layer's nominal dtype (follows ``.half()``), for code that reads ``linear.weight`` directly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = -1,
        sym: bool = False,
        *,
        bias: bool = True,
        n_groups: int | None = None,
        zeros_dtype: torch.dtype = torch.uint8,
        act_order: bool = False,
        cache_weight: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.sym = bits, group_size, bool(sym)
        self.cache_weight = bool(cache_weight)
        if n_groups is None:
            n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, **kw)
        )
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float32, **kw))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=zeros_dtype, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.register_buffer("perm", torch.arange(in_features, **kw) if act_order else None)
        # 0-element float buffer carrying the layer's nominal dtype/device (not saved)
        self.register_buffer("_dtype_anchor", torch.empty(0, dtype=dtype, **kw), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.register_parameter("bias", None)
        self._cache = None

    @classmethod
    def from_result(
        cls,
        result: QuantResult,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        cache_weight: bool = False,
        verify: bool = True,
        name: str = "QuantLinear",
    ) -> "QuantLinear":
        """Build from a quantizer's result.  ``bias``: the layer's bias (or None); ``result.bias`` (a refitted
        bias), when set, takes precedence.  ``dtype``: nominal dtype of the layer (default: the bias dtype,
        else float32).  With ``verify`` the packed weight is checked bit-exact to ``result.weight``."""
        packed = _pack_result(name, result, verify=verify)
        rows, cols = result.weight.shape
        b = result.bias if result.bias is not None else bias
        if dtype is None:
            dtype = bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32
        device = result.weight.device
        m = cls(
            cols,
            rows,
            result.bits,
            result.group_size,
            result.sym,
            bias=b is not None,
            n_groups=packed["scales"].shape[1],
            zeros_dtype=packed["zeros"].dtype,
            act_order="perm" in packed,
            cache_weight=cache_weight,
            dtype=dtype,
            device=device,
        )
        m._set_packed(packed, name=name)
        if b is not None:
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != (rows,):
                raise EPMQError(f"{name}.bias: expected shape ({rows},), got {_describe(b)}")
            with torch.no_grad():
                m.bias.copy_(b.detach())
        return m

    def _set_packed(self, packed: dict[str, torch.Tensor], *, name: str = "QuantLinear") -> None:
        _validate_packed(
            name,
            rows=self.out_features,
            cols=self.in_features,
            bits=self.bits,
            perm=packed.get("perm"),
            **{k: packed[k] for k in ("qweight", "scales", "zeros", "g_idx")},
        )
        device = self._dtype_anchor.device
        for k in SUFFIXES:
            if k in packed:
                self._buffers[k] = packed[k].to(device).contiguous()
        self._cache = None

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in)."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.g_idx, self.bits, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize().to(self._dtype_anchor.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._cache
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantize().to(x.dtype)
            self._cache = w if self.cache_weight else None
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, "
            f"act_order={self.perm is not None}"
        )


class PackedParam(_Float32BuffersMixin, nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization that turns a (removed) 2-D Parameter into its
    dequantized packed weight.  Registered with ``unsafe=True`` over an empty ``original`` Parameter (which
    only carries the nominal dtype/device: the output follows ``.half()`` and ``.to()``).

    Use :func:`quantize_parameter` to attach it.  ``cache_weight=True`` keeps the dequantized tensor; by
    default it is only reused within one forward of the scope module (see :func:`quantize_parameter`).
    """

    def __init__(
        self,
        packed: dict[str, torch.Tensor],
        *,
        rows: int,
        cols: int,
        bits: int,
        group_size: int,
        sym: bool,
        cache_weight: bool = False,
        name: str = "param",
    ):
        super().__init__()
        _validate_packed(
            name,
            rows=rows,
            cols=cols,
            bits=bits,
            perm=packed.get("perm"),
            **{k: packed[k] for k in ("qweight", "scales", "zeros", "g_idx")},
        )
        self.out_features, self.in_features = rows, cols
        self.bits, self.group_size, self.sym = bits, group_size, bool(sym)
        self.cache_weight = bool(cache_weight)
        for k in SUFFIXES:
            self.register_buffer(k, packed[k].contiguous() if k in packed else None)
        self._cache = None
        self._scope_depth = 0
        self._registered = False

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        if self._registered:
            raise EPMQError(
                f"cannot assign to a packed quantized parameter ({self.out_features}x{self.in_features}, "
                f"{self.bits} bits): remove the parametrization or re-quantize"
            )
        return value.new_empty(0)

    def dequantize(self) -> torch.Tensor:
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.g_idx, self.bits, self.in_features)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        w = self._cache
        if w is None or w.dtype != original.dtype or w.device != self.qweight.device:
            w = self.dequantize().to(original.dtype)
            self._cache = w if (self.cache_weight or self._scope_depth > 0) else None
        return w

    # scope hooks: reuse the dequantized tensor during one forward of the scope module
    def _enter_scope(self):
        self._scope_depth += 1

    def _exit_scope(self):
        self._scope_depth = max(0, self._scope_depth - 1)
        if self._scope_depth == 0 and not self.cache_weight:
            self._cache = None

    def extra_repr(self) -> str:
        return (
            f"shape=({self.out_features}, {self.in_features}), bits={self.bits}, group_size={self.group_size}, "
            f"sym={self.sym}, act_order={self.perm is not None}"
        )


def _scope_pre_hook(module, args):
    for p in module._epmq_scope_params:
        p._enter_scope()


def _scope_post_hook(module, args, output):
    for p in module._epmq_scope_params:
        p._exit_scope()


def _add_scope(scope: nn.Module, p: PackedParam) -> None:
    if not hasattr(scope, "_epmq_scope_params"):
        scope._epmq_scope_params = []
        scope.register_forward_pre_hook(_scope_pre_hook)
        scope.register_forward_hook(_scope_post_hook, always_call=True)
    scope._epmq_scope_params.append(p)


def _split(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def _get_module(model: nn.Module, path: str, *, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise EPMQError(f"{what}: module {path!r} not found in the model ({e})") from None


def quantize_parameter(
    model: nn.Module,
    name: str,
    packed: dict[str, torch.Tensor],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    cache_weight: bool = False,
) -> PackedParam:
    """Replace the 2-D Parameter ``name`` (full dotted name) of ``model`` by a :class:`PackedParam`
    parametrization: ``module.<leaf>`` then returns the dequantized weight (in the Parameter's dtype) on every
    access.  The dequantized tensor is reused within one forward of the owning module -- or of the enclosing
    ``nn.MultiheadAttention`` when the owner is its ``out_proj`` (whose forward MHA never calls).
    """
    owner_path, leaf = _split(name)
    owner = _get_module(model, owner_path, what=name)
    param = owner._parameters.get(leaf)
    if not isinstance(param, torch.Tensor):
        raise EPMQError(f"{name}: not a parameter of module {owner_path or '<root>'} ({type(owner).__name__})")
    if param.dim() != 2:
        raise EPMQError(f"{name}: only 2-D parameters can be quantized, got shape {tuple(param.shape)}")
    rows, cols = param.shape
    p = PackedParam(
        packed, rows=rows, cols=cols, bits=bits, group_size=group_size, sym=sym, cache_weight=cache_weight, name=name
    )
    p.to(param.device)
    # a fresh empty Parameter as `original`: never set_() the old one (it may be tied elsewhere)
    owner._parameters[leaf] = nn.Parameter(param.detach().new_empty(0), requires_grad=False)
    parametrize.register_parametrization(owner, leaf, p, unsafe=True)
    p._registered = True
    scope = owner
    if owner_path:
        parent_path, _ = _split(owner_path)
        parent = _get_module(model, parent_path, what=name)
        if isinstance(parent, nn.MultiheadAttention) and owner is getattr(parent, "out_proj", None):
            scope = parent
    _add_scope(scope, p)
    return p


def _is_plain_linear_weight(owner: nn.Module, leaf: str) -> bool:
    return type(owner) is nn.Linear and leaf == "weight"


# ------------------------------------------------------------------------------------------ save / load


def _bias_key(name: str) -> str | None:
    owner, leaf = _split(name)
    if not leaf.endswith("weight"):
        return None
    b = leaf[: -len("weight")] + "bias"
    return f"{owner}.{b}" if owner else b


def _jsonable(config: dict) -> dict:
    if not isinstance(config, dict):
        raise EPMQError(f"config: expected a dict, got {type(config).__name__}")
    for k, v in config.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise EPMQError(f"config[{k!r}]: not JSON-serializable ({e})") from None
    return config


def _pack_all(model, results: dict, sd: dict, verify: bool) -> tuple[dict, dict, dict]:
    """(packed tensors by checkpoint key, per-parameter metadata, refitted biases) of every result, checked
    against the model."""
    out: dict[str, torch.Tensor] = {}
    params_meta: dict[str, dict] = {}
    refit: dict[str, torch.Tensor] = {}
    for name, res in results.items():
        if not isinstance(name, str) or name not in sd:
            raise EPMQError(f"results[{name!r}]: not a key of model.state_dict()")
        owner_path, leaf = _split(name)
        owner = _get_module(model, owner_path, what=name)
        if not isinstance(owner._parameters.get(leaf), torch.Tensor):
            raise EPMQError(f"results[{name!r}]: not a Parameter of {type(owner).__name__}")
        if not isinstance(res, QuantResult):
            raise EPMQError(f"results[{name!r}]: expected a QuantResult, got {type(res).__name__}")
        if not isinstance(res.weight, torch.Tensor) or tuple(res.weight.shape) != tuple(sd[name].shape):
            raise EPMQError(
                f"results[{name!r}]: result.weight {_describe(res.weight)} does not match the model's "
                f"parameter shape {tuple(sd[name].shape)}"
            )
        packed = _pack_result(name, res, verify=verify)
        for k, t in packed.items():
            key = f"{name}.{k}"
            if key in sd:
                raise EPMQError(f"{key}: packed key collides with a model.state_dict() key")
            out[key] = t.detach().cpu().contiguous()
        rows, cols = res.weight.shape
        bias_key, bias_added = None, False
        if res.bias is not None:
            bias_key = _bias_key(name)
            if not isinstance(res.bias, torch.Tensor) or tuple(res.bias.shape) != (rows,):
                raise EPMQError(f"results[{name!r}].bias: expected shape ({rows},), got {_describe(res.bias)}")
            if not torch.isfinite(res.bias).all():
                raise EPMQError(f"results[{name!r}].bias: holds non-finite values")
            if bias_key is None:
                raise EPMQError(f"results[{name!r}].bias: no bias key for a parameter not named '*weight'")
            if bias_key in refit:
                raise EPMQError(f"{bias_key}: refitted by two results")
            if bias_key not in sd:
                if not _is_plain_linear_weight(owner, leaf):
                    raise EPMQError(f"results[{name!r}].bias: the model has no bias tensor {bias_key!r} to replace")
                bias_added = True
            refit[bias_key] = res.bias.detach().to(torch.float32).cpu().contiguous()
        params_meta[name] = {
            "shape": [rows, cols],
            "bits": res.bits,
            "group_size": res.group_size,
            "sym": bool(res.sym),
            "n_groups": int(packed["scales"].shape[1]),
            "act_order": "perm" in packed,
            "zeros_dtype": str(packed["zeros"].dtype).removeprefix("torch."),
            "module": "QuantLinear" if _is_plain_linear_weight(owner, leaf) else "parametrization",
            "bias": bias_key,
            "bias_refit": res.bias is not None,
            "bias_added": bias_added,
        }

    return out, params_meta, refit


def _add_others(out: dict, sd: dict, results: dict, refit: dict) -> None:
    """Every tensor of ``sd`` that is not quantized into ``out`` (refitted biases in place of the model's; tied
    tensors as copies: safetensors stores no shared storage), then the biases a bias-free Linear gains."""
    seen_storages: set[int] = set()
    for k, v in sd.items():
        if k in results:
            continue
        t = refit[k] if k in refit else v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storages:  # tied / shared tensors: safetensors needs separate storage
            t = t.clone()
        elif t.numel():
            seen_storages.add(ptr)
        out[k] = t
    for k, t in refit.items():
        if k not in sd:
            out[k] = t


def save_quantized(
    model: nn.Module,
    results: dict[str, QuantResult],
    path_dir,
    *,
    config: dict | None = None,
    verify: bool = True,
) -> dict:
    """Write a packed checkpoint of ``model`` to ``path_dir`` (``model.safetensors`` + ``quant_config.json``).

    ``results`` maps full parameter names (as in ``model.state_dict()``) to their :class:`QuantResult`.  The
    model's own values of those parameters are ignored; every other state-dict tensor is stored as is (its
    dtype kept); a refitted ``result.bias`` (float32) replaces the bias tensor (``<owner>.bias`` for
    ``weight``, ``in_proj_bias`` for ``in_proj_weight``).  A plain ``nn.Linear`` without bias may receive a
    refitted bias (recorded as ``bias_added``).  ``config`` (JSON-serializable: method, merge, calibration
    provenance, ...) is stored under ``"config"``.  With ``verify`` every packed weight is checked bit-exact to
    ``result.weight``.  Returns :func:`checkpoint_size_report`.
    """
    from safetensors.torch import save_file

    config = _jsonable({} if config is None else config)
    if not isinstance(results, dict) or not results:
        raise EPMQError("results: expected a non-empty dict {parameter name: QuantResult}")
    sd = model.state_dict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise EPMQError(f"state_dict[{k!r}]: {type(v).__name__} cannot be stored in safetensors")
    if any(isinstance(m, (QuantLinear, PackedParam)) for m in model.modules()):
        raise EPMQError("model: already holds packed quantized modules; save the unquantized architecture")

    out, params_meta, refit = _pack_all(model, results, sd, verify)
    _add_others(out, sd, results, refit)

    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_id = uuid.uuid4().hex
    st_meta = {
        "format": "pt",
        "epmq_format": FORMAT_NAME,
        "epmq_format_version": str(FORMAT_VERSION),
        "epmq_checkpoint_id": checkpoint_id,
    }
    wpath = path_dir / WEIGHTS_FILE
    with atomic_path(wpath) as tmp:
        save_file(out, str(tmp), metadata=st_meta)
    qcfg = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "weights_file": WEIGHTS_FILE,
        "weights_file_bytes": wpath.stat().st_size,
        "packing": {"container": "uint8", "bit_order": BIT_ORDER, "layout": PACKING_DOC, "dequant": DEQUANT_DOC},
        "quantized_params": list(params_meta),
        "params": params_meta,
        "config": config,
    }
    text = json.dumps(qcfg, indent=2, sort_keys=False) + "\n"
    write_text_atomic(path_dir / CONFIG_FILE, text)
    return checkpoint_size_report(path_dir)


def _read_config(path_dir: Path) -> dict:
    cpath = path_dir / CONFIG_FILE
    if not cpath.is_file():
        raise EPMQError(f"{cpath}: missing (not an epmq packed checkpoint directory)")
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:
        raise EPMQError(f"{cpath}: unreadable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise EPMQError(
            f"{cpath}: 'format' is {cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT_NAME!r}"
        )
    if cfg.get("format_version") != FORMAT_VERSION:
        raise EPMQError(
            f"{cpath}: unsupported format_version {cfg.get('format_version')!r} (this epmq reads {FORMAT_VERSION})"
        )
    if cfg.get("packing", {}).get("bit_order") != BIT_ORDER:
        raise EPMQError(
            f"{cpath}: packing.bit_order {cfg.get('packing', {}).get('bit_order')!r}, expected {BIT_ORDER!r}"
        )
    params = cfg.get("params")
    if not isinstance(params, dict) or list(params) != cfg.get("quantized_params"):
        raise EPMQError(f"{cpath}: 'params' and 'quantized_params' are missing or disagree")
    for name, m in params.items():
        try:
            rows, cols = (int(x) for x in m["shape"])
            check_bits(m["bits"], name=f"{cpath}: params[{name!r}].bits")
            m["group_size"], m["sym"], m["n_groups"], m["act_order"]  # noqa: B018
        except (KeyError, TypeError, ValueError) as e:
            raise EPMQError(f"{cpath}: params[{name!r}] is malformed ({e!r})") from None
    return cfg


def load_quantized(model: nn.Module, path_dir, *, cache_weight: bool = False) -> nn.Module:
    """Load a packed checkpoint into ``model`` (the unquantized architecture; its weights are overwritten).

    Non-quantized tensors are copied into the model (``load_state_dict`` semantics: cast to the model's
    dtypes); each quantized plain ``nn.Linear`` is replaced by :class:`QuantLinear`, every other quantized
    parameter (MHA ``in_proj_weight``, ``out_proj.weight``, ...) by a :class:`PackedParam` parametrization.
    Missing / unexpected keys, shape or dtype mismatches and format problems raise :class:`EPMQError` naming
    the key or file.  Returns the model (a new object only when the root itself is a quantized Linear).
    """
    cfg, wpath, tensors = _read_packed_file(Path(path_dir))
    if any(isinstance(m, (QuantLinear, PackedParam)) for m in model.modules()):
        raise EPMQError("model: already holds packed quantized modules; pass the unquantized architecture")
    sd = model.state_dict()
    params: dict = cfg["params"]
    packed_all, added_bias = _take_packed(model, sd, params, tensors, wpath)
    _load_others(model, sd, params, tensors, wpath)
    return _install_packed(model, params, packed_all, added_bias, cache_weight)


def _read_packed_file(path_dir: Path) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """(config, weights path, every tensor) of a packed checkpoint folder, its two files checked to belong
    together."""
    from safetensors.torch import load_file

    cfg = _read_config(path_dir)
    wpath = path_dir / cfg.get("weights_file", WEIGHTS_FILE)
    if not wpath.is_file():
        raise EPMQError(f"{wpath}: missing")
    st_meta = read_safetensors_header(wpath).metadata
    if st_meta.get("epmq_format") != FORMAT_NAME or st_meta.get("epmq_format_version") != str(FORMAT_VERSION):
        raise EPMQError(f"{wpath}: safetensors metadata does not declare {FORMAT_NAME} v{FORMAT_VERSION}")
    if st_meta.get("epmq_checkpoint_id") != cfg.get("checkpoint_id"):
        raise EPMQError(f"{wpath}: checkpoint_id does not match {path_dir / CONFIG_FILE} (files from different saves)")
    try:
        tensors = load_file(str(wpath), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise EPMQError(f"{wpath}: cannot be loaded by safetensors ({type(e).__name__}: {e})") from None
    return cfg, wpath, tensors


def _take_packed(model, sd, params: dict, tensors: dict, wpath: Path) -> tuple[dict, dict]:
    """Each quantized parameter's packed tensors (validated) and added bias, taken out of ``tensors``."""
    packed_all: dict[str, dict[str, torch.Tensor]] = {}
    added_bias: dict[str, torch.Tensor] = {}
    for name, m in params.items():
        rows, cols = (int(x) for x in m["shape"])
        if name not in sd:
            raise EPMQError(f"{wpath}: quantized parameter {name!r} is not in the model's state_dict")
        if tuple(sd[name].shape) != (rows, cols):
            raise EPMQError(f"{name}: model parameter has shape {tuple(sd[name].shape)}, checkpoint has {(rows, cols)}")
        owner_path, leaf = _split(name)
        owner = _get_module(model, owner_path, what=name)
        if not isinstance(owner._parameters.get(leaf), torch.Tensor):
            raise EPMQError(f"{name}: not a Parameter of {type(owner).__name__} in the model")
        keys = ["qweight", "scales", "zeros", "g_idx"] + (["perm"] if m["act_order"] else [])
        missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in tensors]
        if missing:
            raise EPMQError(f"{wpath}: missing key(s) {missing}")
        packed = {k: tensors.pop(f"{name}.{k}") for k in keys}
        _validate_packed(
            name,
            rows=rows,
            cols=cols,
            bits=m["bits"],
            n_groups=int(m["n_groups"]),
            perm=packed.get("perm"),
            **{k: packed[k] for k in ("qweight", "scales", "zeros", "g_idx")},
        )
        packed_all[name] = packed
        if m.get("bias_added"):
            bk = m.get("bias")
            if not _is_plain_linear_weight(owner, leaf) or bk in sd:
                raise EPMQError(
                    f"{name}: checkpoint adds a bias {bk!r} but the model's layer is not a bias-free nn.Linear"
                )
            if bk not in tensors:
                raise EPMQError(f"{wpath}: missing key {bk!r}")
            b = tensors.pop(bk)
            if tuple(b.shape) != (rows,) or not b.is_floating_point():
                raise EPMQError(f"{bk}: expected float of shape ({rows},), got {_describe(b)}")
            added_bias[name] = b
    return packed_all, added_bias


def _load_others(model, sd, params: dict, tensors: dict, wpath: Path) -> None:
    """Every non-quantized tensor into ``model`` (``load_state_dict`` semantics), keys and shapes checked."""
    expected = [k for k in sd if k not in params]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in sd or k in params]
    if missing:
        raise EPMQError(f"{wpath}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise EPMQError(f"{wpath}: unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k in expected:
        t, ref = tensors[k], sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise EPMQError(f"{k}: checkpoint shape {tuple(t.shape)} does not match the model's {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise EPMQError(f"{k}: checkpoint dtype {t.dtype} is incompatible with the model's {ref.dtype}")
    result = model.load_state_dict({k: tensors[k] for k in expected}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(params):
        raise EPMQError(
            f"{wpath}: load_state_dict disagreed (missing {result.missing_keys}, unexpected {result.unexpected_keys})"
        )


def _install_packed(model, params: dict, packed_all: dict, added_bias: dict, cache_weight: bool) -> nn.Module:
    """Replace each quantized plain Linear by a :class:`QuantLinear`, parametrize every other quantized
    parameter; returns the model (a new object only when the root itself is a quantized Linear)."""
    root = model
    for name, m in params.items():
        packed = packed_all[name]
        owner_path, leaf = _split(name)
        owner = _get_module(model, owner_path, what=name)
        param = owner._parameters[leaf]
        if not _is_plain_linear_weight(owner, leaf):
            quantize_parameter(
                model, name, packed, bits=m["bits"], group_size=m["group_size"], sym=m["sym"], cache_weight=cache_weight
            )
            continue
        rows, cols = param.shape
        q = QuantLinear(cols, rows, m["bits"], m["group_size"], m["sym"], bias=False, n_groups=int(m["n_groups"]),
                        zeros_dtype=packed["zeros"].dtype, act_order=m["act_order"], cache_weight=cache_weight,
                        dtype=param.dtype, device=param.device)
        q._set_packed(packed, name=name)
        if name in added_bias:
            q.bias = nn.Parameter(added_bias[name].to(device=param.device, dtype=param.dtype))
        else:
            q.bias = owner.bias  # already loaded (refitted or original); None stays None
        q.train(owner.training)
        if owner_path:
            parent_path, child = _split(owner_path)
            setattr(_get_module(model, parent_path, what=name), child, q)
        else:
            root = q
    return root


def read_packed(path_dir) -> tuple[dict, dict[str, QuantResult], dict[str, torch.Tensor]]:
    """A packed checkpoint as data, no model needed: ``(quant_config.json, {name: QuantResult}, other tensors)``.

    Each result's ``codes`` (uint8), ``scales``, ``zeros`` (float32), ``g_idx``, ``perm``, ``bits``,
    ``group_size`` and ``sym`` are the stored ones and ``weight`` is :func:`dequantize_packed` of them (bit-exact
    to the fake-quant weight that was saved); ``bias`` stays None: refitted biases are among the other tensors,
    under the model's bias key, as the checkpoint stores them.
    """
    from safetensors.torch import load_file

    path_dir = Path(path_dir)
    cfg = _read_config(path_dir)
    wpath = path_dir / cfg.get("weights_file", WEIGHTS_FILE)
    if not wpath.is_file():
        raise EPMQError(f"{wpath}: missing")
    try:
        tensors = load_file(str(wpath), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise EPMQError(f"{wpath}: cannot be loaded by safetensors ({type(e).__name__}: {e})") from None
    results = {}
    for name, m in cfg["params"].items():
        rows, cols = (int(x) for x in m["shape"])
        keys = ["qweight", "scales", "zeros", "g_idx"] + (["perm"] if m["act_order"] else [])
        missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in tensors]
        if missing:
            raise EPMQError(f"{wpath}: missing key(s) {missing}")
        p = {k: tensors.pop(f"{name}.{k}") for k in keys}
        _validate_packed(name, rows=rows, cols=cols, bits=m["bits"], n_groups=int(m["n_groups"]), perm=p.get("perm"),
                         **{k: p[k] for k in ("qweight", "scales", "zeros", "g_idx")})
        results[name] = QuantResult(
            weight=dequantize_packed(p["qweight"], p["scales"], p["zeros"], p["g_idx"], m["bits"], cols),
            codes=unpack_codes(p["qweight"], m["bits"], cols), scales=p["scales"], zeros=p["zeros"].float(),
            g_idx=p["g_idx"], perm=p.get("perm"), bits=m["bits"], group_size=m["group_size"], sym=m["sym"])
    return cfg, results, tensors


def checkpoint_size_report(path_dir) -> dict:
    """Sizes of a packed checkpoint, from the safetensors header (no tensor data read).

    Returns ``file_bytes`` (model.safetensors on disk), ``config_bytes``, ``total_bytes``, ``header_bytes``,
    ``n_quantized``, ``quantized_fp16_bytes`` (2 bytes per quantized weight element),
    ``quantized_code_bytes`` (the ``qweight`` tensors), ``quantized_meta_bytes`` (scales, zeros, g_idx, perm),
    ``quantized_packed_bytes`` (code + meta), ``code_ratio`` / ``packed_ratio`` (over fp16 bytes),
    ``other_bytes`` (non-quantized tensors) and per-parameter ``params``.
    """
    path_dir = Path(path_dir)
    cfg = _read_config(path_dir)
    wpath = path_dir / cfg.get("weights_file", WEIGHTS_FILE)
    if not wpath.is_file():
        raise EPMQError(f"{wpath}: missing")
    header = read_safetensors_header(wpath)
    nbytes = header.nbytes

    per = {}
    qkeys = set()
    for name, m in cfg["params"].items():
        rows, cols = (int(x) for x in m["shape"])
        code = nbytes(f"{name}.qweight")
        meta = sum(nbytes(f"{name}.{k}") for k in ("scales", "zeros", "g_idx", "perm"))
        qkeys.update(f"{name}.{k}" for k in SUFFIXES)
        fp16 = 2 * rows * cols
        per[name] = {
            "bits": m["bits"],
            "shape": [rows, cols],
            "fp16_bytes": fp16,
            "code_bytes": code,
            "meta_bytes": meta,
            "packed_ratio": (code + meta) / fp16 if fp16 else 0.0,
        }
    fp16 = sum(p["fp16_bytes"] for p in per.values())
    code = sum(p["code_bytes"] for p in per.values())
    meta = sum(p["meta_bytes"] for p in per.values())
    other = sum(nbytes(k) for k in header.tensors if k not in qkeys)
    file_bytes = wpath.stat().st_size
    config_bytes = (path_dir / CONFIG_FILE).stat().st_size
    header_bytes = header.data_start
    return {
        "path": str(path_dir),
        "file_bytes": file_bytes,
        "config_bytes": config_bytes,
        "total_bytes": file_bytes + config_bytes,
        "header_bytes": header_bytes,
        "n_quantized": len(per),
        "quantized_fp16_bytes": fp16,
        "quantized_code_bytes": code,
        "quantized_meta_bytes": meta,
        "quantized_packed_bytes": code + meta,
        "code_ratio": code / fp16 if fp16 else 0.0,
        "packed_ratio": (code + meta) / fp16 if fp16 else 0.0,
        "other_bytes": other,
        "params": per,
    }


__all__ = [
    "BIT_ORDER",
    "FORMAT_VERSION",
    "PackedParam",
    "QuantLinear",
    "checkpoint_size_report",
    "dequantize_packed",
    "load_quantized",
    "pack_codes",
    "packed_row_bytes",
    "quantize_parameter",
    "read_packed",
    "save_quantized",
    "unpack_codes",
]
