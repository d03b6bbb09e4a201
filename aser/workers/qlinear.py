"""Fake-quantized linear: the exact W4A8 (+ low-rank) numerics, in float, for simulation.

    y = DQ(q, scale) · Q_a(x̃) + (x̃ L_Bᵀ) L_Aᵀ + bias

The main path sees INT8 per-token fake-quantized activations; the low-rank path sees the
unquantized (smoothed) input, as in ASER. The smoothing itself is folded upstream.
"""

from __future__ import annotations

import torch
from torch import nn

from aser.kernels.quant import dequantize_weight, fake_quantize_activation
from aser.workers.reconstruct import LinearResult, MethodConfig, SmoothedLayer


class SimQuantLinear(nn.Module):
    weight: torch.Tensor  # (N, K) dequantized
    bias: torch.Tensor | None
    L_A: torch.Tensor | None  # (N, r)
    L_B: torch.Tensor | None  # (r, K)
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        L_A: torch.Tensor | None,
        L_B: torch.Tensor | None,
        a_bits: int | None,
        num_side: int = 0,
        a_style: str = "compressed-tensors",
    ) -> None:
        super().__init__()
        self.num_side = num_side  # trailing columns of L_A that are exact 16-bit input columns
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("L_A", L_A)
        self.register_buffer("L_B", L_B)
        self.a_bits = a_bits
        self.a_style = a_style  # whose INT8 activation quantizer (kernels.quant.ACT_QUANT_STYLES)

    @classmethod
    def from_result(
        cls, res: LinearResult, bias: torch.Tensor | None, a_bits: int | None, group_size: int | None,
        a_style: str = "compressed-tensors",
    ) -> SimQuantLinear:
        W = dequantize_weight(res.q, res.scale, group_size)
        return cls(W, bias, res.L_A, res.L_B, a_bits, int(res.metrics.get("num_side_columns", 0)), a_style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x if self.a_bits is None else fake_quantize_activation(x, self.a_bits, self.a_style)
        y = nn.functional.linear(xq, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.L_A is not None and self.L_B is not None:
            y = y + (x @ self.L_B.to(x.dtype).T) @ self.L_A.to(x.dtype).T
        return y

    def extra_repr(self) -> str:
        r = 0 if self.L_A is None else self.L_A.shape[1]
        return f"in={self.in_features}, out={self.out_features}, a_bits={self.a_bits}, a_style={self.a_style}, rank={r}"


def install_quantized(
    layer: nn.Module, sm: SmoothedLayer, results: dict[str, LinearResult], cfg: MethodConfig
) -> None:
    """Replace the layer's linears by SimQuantLinear and load the folded FP tensors (norms)."""
    linear_names = set(results)
    for name, res in results.items():
        parent_name, child = name.rsplit(".", 1)
        bias = sm.tensors.get(f"{name}.bias")
        sim = SimQuantLinear.from_result(res, bias, cfg.a_bits, cfg.group_size, cfg.act_quant)
        setattr(layer.get_submodule(parent_name), child, sim)
    params = dict(layer.named_parameters())
    for key, t in sm.tensors.items():
        mod = key.rsplit(".", 1)[0]
        if mod in linear_names:
            continue
        if key in params:
            params[key].data.copy_(t)
