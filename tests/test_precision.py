"""epmq.precision: the one-cast Linear weights context gives autocast's bits and restores the fp32 weights."""

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
