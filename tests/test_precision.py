"""epmq.precision: the one-cast Linear weights context gives autocast's bits and restores the fp32 weights."""

import pytest
import torch

from epmq.precision import autocast, linear_weights_in


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                               torch.nn.Linear(32, 8, bias=False)).eval()


def test_linear_weights_in_bf16_gives_autocast_bits_and_restores_weights():
    net, x = _net(), torch.randn(5, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad(), autocast("cpu", "bf16"):
        ref = net(x)
    with torch.no_grad(), linear_weights_in(net, "bf16"):
        assert net[0].weight.dtype == torch.bfloat16 and net[2].weight.dtype == torch.float32  # LayerNorm kept
        with autocast("cpu", "bf16"):
            out = net(x)
    assert torch.equal(out, ref)
    for k, v in net.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def test_linear_weights_in_restores_on_error_and_fp32_is_a_no_op():
    net = _net()
    w = net[0].weight
    try:
        with linear_weights_in(net, "bf16"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert net[0].weight is w and w.dtype == torch.float32
    with linear_weights_in(net, "fp32"):
        assert net[0].weight.dtype == torch.float32


def test_bf16_grams_on_cuda_run_as_tf32_which_is_exact_on_bf16_values():
    """On CUDA, ``add_gram`` runs a product of bf16 values as a TF32 GEMM. TF32 keeps the top 10 of float32's 23
    mantissa bits; a bf16 value has 7, so the 13 bits TF32 drops are zero and the inputs pass unrounded
    (products exact, sums float32: the same numbers as the CPU paths). The mode is set only for the product
    and restored after, also on error."""
    from epmq.precision import _bf16_gram_context, _cublas_tf32

    x = torch.randn(4096).mul(torch.logspace(-20, 20, 4096)).to(torch.bfloat16).float()
    assert int((x.view(torch.int32) & 0x1FFF).abs().sum()) == 0
    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    with _bf16_gram_context(torch.device("cuda")):
        assert flags.fp32_precision == "tf32"
    assert flags.fp32_precision == before
    with pytest.raises(ValueError):
        with _cublas_tf32():
            raise ValueError("boom")
    assert flags.fp32_precision == before
    with _bf16_gram_context(torch.device("cpu")):
        assert flags.fp32_precision == before  # a CPU product never touches the cuBLAS flag
