"""AserLinear: an INT4-weight linear layer with the ASER low-rank correction, for inference.

    y = DQ(W_q) Q_a(x) + L_A (L_B x) + bias        (W4A8: a_bits = 8)
    y = DQ(W_q) x      + L_A (L_B x) + bias        (W4A16: a_bits = None)

The smoothing scale is folded upstream in our checkpoints, so x arrives already smoothed.
"""

from __future__ import annotations

import torch
from torch import nn

from aser.kernels.act_quant import quantize_activation_int8
from aser.kernels.backend import BACKENDS, Backend
from aser.kernels.gemm import LOWRANK_MODES, LowRankMode, w4a8_gemm, w4a16_gemm
from aser.kernels.quant import ACT_QUANT_STYLES, pack_int4, quantize_activation_marlin

W_BITS = 4
A_BITS_SUPPORTED = (8, None)


class AserLinear(nn.Module):
    """Packed INT4 weights (N, ceil(K/8)) int32, per-channel scales (N, 1), optional low-rank
    L_A: (N, r), L_B: (r, K) and bias (N,). Holds buffers, not parameters: nothing trains."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    L_A: torch.Tensor | None
    L_B: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        in_features: int,
        *,
        L_A: torch.Tensor | None = None,
        L_B: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        a_bits: int | None = 8,
        lowrank_mode: LowRankMode = "separate",
        backend: Backend = "auto",
        a_style: str = "compressed-tensors",
    ) -> None:
        super().__init__()
        if a_bits not in A_BITS_SUPPORTED:
            raise ValueError(f"a_bits must be 8 (W4A8) or None (W4A16), got {a_bits}")
        if a_style not in ACT_QUANT_STYLES:
            raise ValueError(f"a_style must be one of {ACT_QUANT_STYLES}, got {a_style!r}")
        if lowrank_mode not in LOWRANK_MODES:
            raise ValueError(f"lowrank_mode must be one of {LOWRANK_MODES}, got {lowrank_mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
            raise ValueError(f"weight_packed must be 2-D int32, got {weight_packed.dtype}")
        N = weight_packed.shape[0]
        if weight_packed.shape[1] != (in_features + 7) // 8:
            raise ValueError(
                f"weight_packed has {weight_packed.shape[1]} words per row; "
                f"in_features={in_features} needs {(in_features + 7) // 8}"
            )
        if weight_scale.numel() != N:
            raise ValueError(f"weight_scale must have {N} entries, got {tuple(weight_scale.shape)}")
        if (L_A is None) != (L_B is None):
            raise ValueError("L_A and L_B must be given together")
        if L_A is not None and L_B is not None:
            r = L_B.shape[0]
            if L_B.shape != (r, in_features) or L_A.shape != (N, r):
                raise ValueError(
                    f"L_B must be (r, {in_features}) and L_A ({N}, r); "
                    f"got {tuple(L_B.shape)}, {tuple(L_A.shape)}"
                )
        self.in_features = in_features
        self.out_features = N
        self.a_bits = a_bits
        # Whose INT8 activation quantizer: compressed-tensors' (our fused kernel) or vLLM
        # Marlin's (kernels.quant.quantize_activation_marlin, in torch: fp32 scales).
        self.a_style = a_style
        self.lowrank_mode: LowRankMode = lowrank_mode
        self.backend: Backend = backend
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale.reshape(N, 1))
        self.register_buffer("L_A", L_A)
        self.register_buffer("L_B", L_B)
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        *,
        L_A: torch.Tensor | None = None,
        L_B: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        a_bits: int | None = 8,
        lowrank_mode: LowRankMode = "separate",
        backend: Backend = "auto",
    ) -> AserLinear:
        """From INT4 codes q: (N, K) int8 in [-8, 7] (the int-quantized checkpoint form)."""
        return cls(pack_int4(q), scale, q.shape[1], L_A=L_A, L_B=L_B, bias=bias, a_bits=a_bits,
                   lowrank_mode=lowrank_mode, backend=backend)

    @property
    def rank(self) -> int:
        return 0 if self.L_B is None else int(self.L_B.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) float -> (..., N) in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.a_bits == 8:
            if self.a_style == "marlin":
                q_x, s_x = quantize_activation_marlin(x2)
            else:
                q_x, s_x, _ = quantize_activation_int8(x2, backend=self.backend)
            y = w4a8_gemm(q_x, s_x, self.weight_packed, self.weight_scale, self.in_features,
                          x=x2, L_A=self.L_A, L_B=self.L_B, bias=self.bias, out_dtype=x.dtype,
                          lowrank_mode=self.lowrank_mode, backend=self.backend)
        else:
            y = w4a16_gemm(x2, self.weight_packed, self.weight_scale, self.in_features,
                           L_A=self.L_A, L_B=self.L_B, bias=self.bias, out_dtype=x.dtype,
                           lowrank_mode=self.lowrank_mode, backend=self.backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w_bits={W_BITS}, a_bits={self.a_bits}, a_style={self.a_style}, rank={self.rank}, "
                f"bias={self.bias is not None}, lowrank_mode={self.lowrank_mode}")
