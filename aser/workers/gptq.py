"""GPTQ (Frantar et al. 2022) as a pure function: the drop-in base quantizer for ASER.

Minimises ‖(W − Ŵ) X‖ column by column, pushing each column's rounding error onto the columns
not yet quantized through the upper Cholesky factor of H⁻¹ (H = G + damping). Scales are fixed
before the sweep (per row from the whole row; per group at the group's first column from the
already-updated weights), so they match the reference quantizer's convention.
"""

from __future__ import annotations

import torch

from aser.kernels.quant import int_range, symmetric_scale
from aser.workers.lowrank import damped_cholesky


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    damp: float = 1e-2,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W: (N, K) float64, H: (K, K) float64 (the input Gram). Returns (q (N, K) int8, scale).

    scale: (N, 1) or (N, K // group_size), rounded through ``scale_dtype`` (the dtype the
    checkpoint stores) so that dequantising stored codes gives exactly what GPTQ assumed.
    A given ``scale`` (N, num_groups) is used as is instead.
    """
    N, K = W.shape
    W = W.clone()
    H = H.clone()
    qmin, qmax = int_range(bits)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    L, _, _ = damped_cholesky(H, damp)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    g = group_size or K
    if K % g:
        raise ValueError(f"group_size {group_size} must divide K={K}")
    if group_size:
        block_size = max(block_size // g, 1) * g
    num_groups = K // g

    def _scale(cols: torch.Tensor) -> torch.Tensor:
        s = symmetric_scale(cols.abs().amax(dim=1), bits)
        return s.to(scale_dtype).to(W.dtype) if scale_dtype is not None else s

    fixed = scale is not None
    if scale is not None:
        scale = scale.to(W.dtype).reshape(N, num_groups).clone()
    else:
        scale = torch.empty(N, num_groups, dtype=W.dtype, device=W.device)
        if group_size is None:
            scale[:, 0] = _scale(W)
    Q = torch.zeros(N, K, dtype=torch.int8, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None and col % g == 0 and not fixed:
                scale[:, col // g] = _scale(W1[:, i : i + g])
            s = scale[:, col // g]
            w = W1[:, i]
            q = torch.round(torch.clamp(w / s, qmin, qmax))
            Q[:, col] = q.to(torch.int8)
            err = (w - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scale
