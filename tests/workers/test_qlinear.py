"""SimQuantLinear: the simulation computes with the activation quantizer the method names."""

import torch

from aser.kernels.quant import dequantize_weight, fake_quantize_activation, quantize_weight
from aser.workers.qlinear import SimQuantLinear
from aser.workers.reconstruct import LinearResult


def test_the_activation_quantizer_is_the_methods() -> None:
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(24, 40, generator=g), torch.randn(6, 40, generator=g) * torch.logspace(-1, 1, 40)
    q, scale = quantize_weight(W, 4)
    res = LinearResult(q, scale, None, None)
    out = {}
    for style in ("compressed-tensors", "marlin"):
        lin = SimQuantLinear.from_result(res, None, 8, None, style)
        out[style] = lin(x)
        expect = fake_quantize_activation(x, 8, style) @ dequantize_weight(q, scale).T
        torch.testing.assert_close(out[style], expect, rtol=0, atol=0)
    assert not torch.equal(out["compressed-tensors"], out["marlin"])
    assert "a_style=marlin" in repr(SimQuantLinear.from_result(res, None, 8, None, "marlin"))
