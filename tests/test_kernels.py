"""The fast GPTQ engine (epmq.quant.kernels) against the plain per-column loop it replaces."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from epmq.errors import EPMQError
from epmq.quant import kernels
from epmq.quant.rounding import gptq

ROOT = Path(__file__).resolve().parents[1]

# (group_size, act_order, static_groups, sym, block_size, dead input): groups aligned and not aligned with
# blocks, a block size that does not divide d_in, a dead column
SETTINGS = [
    (-1, False, False, False, 16, False),
    (-1, True, False, True, 7, True),
    (8, False, False, False, 16, False),
    (12, False, False, True, 16, True),
    (12, True, False, False, 7, False),
    (12, True, True, False, 16, False),
    (32, True, True, True, 7, True),
]


def _layer(seed=0, d_out=20, d_in=48):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    X = torch.randn(3 * d_in, d_in, generator=g) * torch.linspace(0.1, 2.0, d_in)
    return W, X.T @ X


def _same(a, b):
    return (torch.equal(a.weight, b.weight) and torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
            and torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx))


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("setting", SETTINGS)
def test_fast_engine_is_the_plain_loop(kernel, bits, setting, monkeypatch):
    if not kernels.available(kernel, "cpu"):
        pytest.skip(f"{kernel} is not installed")
    monkeypatch.setenv("EPMQ_GPTQ_KERNEL", kernel)
    gs, act, static, sym, bs, dead = setting
    W, H = _layer(seed=bits)
    if dead:
        H[3, :] = 0
        H[:, 3] = 0
    kw = dict(group_size=gs, act_order=act, static_groups=static, sym=sym, block_size=bs)
    plain = gptq(W, H, bits, engine="plain", **kw)
    fast = gptq(W, H, bits, engine="fast", **kw)
    # same float32 operations in the same order: bit-identical, not merely close
    assert _same(plain, fast), (kernel, setting)
    assert fast.info["gptq_loss"] == pytest.approx(plain.info["gptq_loss"], rel=1e-5)


def test_kernel_choice_and_errors(monkeypatch):
    monkeypatch.delenv("EPMQ_GPTQ_KERNEL", raising=False)
    expect = "numba" if kernels.available("numba", "cpu") else "torch"
    assert kernels.pick("cpu") == expect
    monkeypatch.setenv("EPMQ_GPTQ_KERNEL", "cuda-magic")
    with pytest.raises(EPMQError, match="EPMQ_GPTQ_KERNEL='cuda-magic'"):
        kernels.pick("cpu")
    monkeypatch.setenv("EPMQ_GPTQ_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EPMQError, match="triton: not available for device cpu"):
        kernels.pick("cpu")
    with pytest.raises(EPMQError, match="engine='turbo'"):
        gptq(*_layer(), 4, engine="turbo")


def test_fast_engine_on_a_real_layer_shape(monkeypatch):
    # a ViT-B width slice: many blocks, the lazy update across them, a group size equal to the block
    monkeypatch.delenv("EPMQ_GPTQ_KERNEL", raising=False)
    W, H = _layer(seed=5, d_out=96, d_in=384)
    kw = dict(group_size=128, block_size=128)
    assert _same(gptq(W, H, 3, engine="plain", **kw), gptq(W, H, 3, engine="fast", **kw))


TRITON_CHECK = """
import itertools, torch
from epmq.quant import kernels
from epmq.quant.rounding import gptq
assert kernels.pick("cpu") == "triton"
g = torch.Generator().manual_seed(0)
W = torch.randn(20, 40, generator=g)
X = torch.randn(120, 40, generator=g) * torch.linspace(0.1, 2.0, 40)
H = X.T @ X
for gs, act, static, bs in [(-1, False, False, 16), (8, True, False, 16), (12, True, True, 7)]:
    kw = dict(group_size=gs, act_order=act, static_groups=static, block_size=bs)
    a, b = gptq(W, H, 3, engine="plain", **kw), gptq(W, H, 3, engine="fast", **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.codes, b.codes), (gs, act, static, bs)
print("ok")
"""


def test_triton_kernel_under_the_interpreter():
    """The CUDA kernel's logic, run by Triton's CPU interpreter (the GPU itself is checked by bench/)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (make test installs it for this check)")
    env = dict(os.environ, TRITON_INTERPRET="1", EPMQ_GPTQ_KERNEL="triton", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(TRITON_CHECK)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
