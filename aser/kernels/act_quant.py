"""Per-token INT8 activation quantization (dynamic, symmetric), optionally fused with smoothing.

Numerics are those of ``quant.quantize_activation(x, 8)`` applied to ``x / m``:
``scale = absmax / 127.5`` (a zero scale becomes the dtype's eps), ``q = round(clamp(x / scale,
-128, 127))`` with round-half-to-even, every intermediate rounded to x's dtype as torch does.
The Triton kernel reproduces that bit for bit: it computes in fp32 with IEEE division and casts
back to x's dtype after each step where torch would round (torch's bf16/fp16 arithmetic is
fp32 arithmetic followed by a round to the storage type).

NaN: a NaN anywhere in a row makes that row's scale NaN (its codes are then meaningless), so the
dequantized row and the GEMM's output row are NaN. A NaN activation never becomes a finite value.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from aser.kernels.backend import HAS_TRITON, Backend, use_triton
from aser.kernels.quant import quantize_activation

A_BITS = 8


class QuantizedActivation(NamedTuple):
    """q: (M, K) int8 codes; scale: (M, 1) in x's dtype; smoothed: x / m (M, K), or None without m."""

    q: torch.Tensor
    scale: torch.Tensor
    smoothed: torch.Tensor | None


def quantize_activation_int8_reference(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    """Pure-torch reference. x: (M, K) float; smooth: (K,) per-channel divisor m, or None."""
    xs = x / smooth.to(x.dtype) if smooth is not None else x
    q, scale = quantize_activation(xs, A_BITS)
    return QuantizedActivation(q, scale, xs if smooth is not None else None)


if HAS_TRITON:
    import triton
    import triton.language as tl

    # 1.5 * 2^23: adding and subtracting it rounds an fp32 of magnitude < 2^22 to an integer,
    # half to even (the FPU's own rounding). libdevice.rint would be the direct spelling, but
    # the interpreter that runs our CPU tests cannot call libdevice.
    # Globals a kernel reads must be tl.constexpr instances (a plain float compiles only under
    # the interpreter).
    _RNE_MAGIC = tl.constexpr(12582912.0)

    def _interpreted() -> bool:
        """Whether triton.jit runs kernels in its CPU interpreter (decided, as triton decides it,
        from TRITON_INTERPRET when the kernels are defined)."""
        knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the env var
        if knobs is not None:
            return bool(knobs.runtime.interpret)
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

    INTERPRETED = tl.constexpr(_interpreted())

    @triton.jit
    def round_fp32_to(x, dtype: tl.constexpr):
        """fp32 -> nearest ``dtype`` value (half to even), returned as fp32; NaN stays NaN.

        On a GPU the cast is ``cvt.rn`` (nearest even). The interpreter's fp32->bf16 cast
        truncates instead, so there bf16 is rounded with integer bit operations; those would
        carry a NaN's payload into the sign/exponent (0x7FFFFFFF becomes -0.0), hence the where.
        """
        if INTERPRETED and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        else:
            return x.to(dtype).to(tl.float32)

    @triton.jit
    def _load_smoothed(x_row, m_ptr, offs, mask, dtype: tl.constexpr, HAS_SMOOTH: tl.constexpr):
        """One block of the row as fp32, divided by the smoothing scale and rounded to dtype."""
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            m = tl.load(m_ptr + offs, mask=mask, other=1.0).to(tl.float32)
            x = round_fp32_to(tl.math.div_rn(x, m), dtype)
        return x

    @triton.jit
    def _act_quant_kernel(
        x_ptr, m_ptr, q_ptr, scale_ptr, xs_ptr, K, eps,
        HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * K
        dtype = x_ptr.dtype.element_ty
        # Pass 1: absmax of the (smoothed) row.
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        nan_seen = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = _load_smoothed(x_row, m_ptr, offs, mask, dtype, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.abs(x))
            nan_seen = tl.maximum(nan_seen, (x != x).to(tl.int32))
        # tl.maximum / tl.max skip NaN (max.f32 on a GPU, fmax in the interpreter), which would
        # turn a NaN activation into a finite code; a NaN makes the row's scale NaN instead, as
        # torch's amax does in the reference, so the GEMM's output row is NaN.
        absmax = tl.where(tl.max(nan_seen, axis=0) > 0, float("nan"), tl.max(amax, axis=0))
        scale = round_fp32_to(tl.math.div_rn(absmax, absmax * 0.0 + 127.5), dtype)
        scale = tl.where(scale == 0.0, eps, scale)
        tl.store(scale_ptr + row, scale.to(dtype))
        # Pass 2: codes (the row is re-read; it is in L2 for any realistic K).
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = _load_smoothed(x_row, m_ptr, offs, mask, dtype, HAS_SMOOTH)
            if HAS_SMOOTH:
                tl.store(xs_ptr + row * K + offs, x.to(dtype), mask=mask)
            v = round_fp32_to(tl.math.div_rn(x, tl.zeros_like(x) + scale), dtype)
            v = tl.minimum(tl.maximum(v, -128.0), 127.0)
            v = (v + _RNE_MAGIC) - _RNE_MAGIC
            tl.store(q_ptr + row * K + offs, v.to(tl.int8), mask=mask)


def quantize_activation_int8_triton(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    """Triton kernel; same contract as the reference. x: (M, K) float16/bfloat16/float32."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16/bf16/fp32 for the Triton kernel, got {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=x.dtype, device=x.device)
    xs = torch.empty_like(x) if smooth is not None else None
    m = smooth.to(x.dtype).contiguous() if smooth is not None else None
    if M == 0 or K == 0:
        if K == 0:
            scale.fill_(torch.finfo(x.dtype).eps)
        return QuantizedActivation(q, scale, xs)
    block_k = min(triton.next_power_of_2(K), 4096)
    _act_quant_kernel[(M,)](
        x, m if m is not None else x, q, scale, xs if xs is not None else x, K,
        torch.finfo(x.dtype).eps, HAS_SMOOTH=smooth is not None, BLOCK_K=block_k,
    )
    return QuantizedActivation(q, scale, xs)


def quantize_activation_int8(
    x: torch.Tensor, smooth: torch.Tensor | None = None, backend: Backend = "auto"
) -> QuantizedActivation:
    """Per-token INT8 quantization of ``x / smooth``. x: (M, K) float; smooth: (K,) or None."""
    if smooth is not None and smooth.shape != (x.shape[-1],):
        raise ValueError(f"smooth must have shape ({x.shape[-1]},), got {tuple(smooth.shape)}")
    if use_triton(backend, x, smooth):
        return quantize_activation_int8_triton(x, smooth)
    return quantize_activation_int8_reference(x, smooth)
