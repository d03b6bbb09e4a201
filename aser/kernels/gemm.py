"""W4A8 and W4A16 GEMMs with the ASER low-rank term fused into the epilogue.

    W4A8:  y = (q_x @ q_w^T)[int32] * s_x * s_w^T  +  (x L_B^T) L_A^T  (+ bias)
    W4A16: y = (x @ q_w^T)[fp32] * s_w^T            +  (x L_B^T) L_A^T  (+ bias)

q_w: INT4 weight codes packed 8 per int32 in the compressed-tensors layout (``quant.pack_int4``:
element k of a row in word k // 8 at bits 4 * (k % 8), stored as q + 8); s_w: (N, 1) per output
channel; q_x, s_x: per-token INT8 codes and scales (``act_quant``); x: the unquantized (smoothed)
input that feeds the low-rank path; L_B: (r, K), L_A: (N, r).

The low-rank product ``t = x L_B^T`` is either computed first by torch (``lowrank_mode=
"separate"``: one small GEMM, then the kernel reads t in its epilogue) or inside the GEMM's K loop
(``"fused"``: no extra launch, but every N-tile recomputes its M-tile's t, r / BLOCK_N extra
work). Which is faster depends on shape and rank; ``python -m aser.kernels.bench.gemm`` measures.

Numerics shared by kernel and reference: integer accumulation is exact (|acc| <= 1024 K);
the epilogue is fp32 ``acc * s_x * s_w`` (in that order) plus the low-rank term accumulated in
fp32, with t rounded once to L_A's dtype; the result is rounded once to the output dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from aser.kernels.backend import HAS_TRITON, Backend, use_triton
from aser.kernels.quant import unpack_int4

LowRankMode = Literal["separate", "fused"]
LOWRANK_MODES: tuple[str, ...] = ("separate", "fused")
_LR_NONE, _LR_SEPARATE, _LR_FUSED = 0, 1, 2


@dataclass(frozen=True)
class GemmBlocks:
    """Tile shape and launch parameters; BLOCK_K must be a multiple of 8 (one packed word)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")


def smaller_tiles(b: GemmBlocks) -> list[GemmBlocks]:
    """Fallbacks for a tile that does not fit the GPU's shared memory, least change first:
    fewer pipeline stages, then half the K block (shared memory scales with both)."""
    out = [dataclasses.replace(b, num_stages=s) for s in range(b.num_stages - 1, 0, -1)]
    if b.block_k >= 32:
        out += [dataclasses.replace(b, block_k=b.block_k // 2, num_stages=s) for s in (2, 1)]
    return out


# Default tiles that had to step down (see _launch), by kernel variant and device.
_FITTED: dict[tuple[object, ...], GemmBlocks] = {}


def default_blocks(M: int, N: int, K: int, a8: bool) -> GemmBlocks:
    """A reasonable tile for the shape; the benchmark sweeps others."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if N <= 64 or M <= 16 else 128
    block_k = 128 if a8 else 64
    num_warps = 4 if block_m * block_n <= 64 * 64 else 8
    return GemmBlocks(block_m, block_n, block_k, num_warps=num_warps)


def _check_common(
    M: int, K: int, w_packed: torch.Tensor, w_scale: torch.Tensor,
    L_A: torch.Tensor | None, L_B: torch.Tensor | None, bias: torch.Tensor | None,
    lowrank_mode: str,
) -> tuple[int, int]:
    """Validate shapes; returns (N, r)."""
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2:
        raise ValueError(f"w_packed must be 2-D int32, got {w_packed.dtype} {tuple(w_packed.shape)}")
    N = w_packed.shape[0]
    if w_packed.shape[1] != (K + 7) // 8:
        raise ValueError(f"w_packed has {w_packed.shape[1]} words per row; K={K} needs {(K + 7) // 8}")
    if w_scale.numel() != N:
        raise ValueError(f"w_scale must hold one scale per output channel ({N}), got {tuple(w_scale.shape)}")
    if (L_A is None) != (L_B is None):
        raise ValueError("L_A and L_B must be given together")
    r = 0
    if L_A is not None and L_B is not None:
        r = L_B.shape[0]
        if L_B.shape != (r, K) or L_A.shape != (N, r):
            raise ValueError(f"L_B must be (r, {K}) and L_A ({N}, r); got {tuple(L_B.shape)}, {tuple(L_A.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if lowrank_mode not in LOWRANK_MODES:
        raise ValueError(f"lowrank_mode must be one of {LOWRANK_MODES}, got {lowrank_mode!r}")
    del M
    return N, r


def _check_in_features(K: int, in_features: int) -> None:
    if K != in_features:
        raise ValueError(f"the input has {K} features but in_features is {in_features}")


def _lowrank_reference(
    x: torch.Tensor, L_A: torch.Tensor | None, L_B: torch.Tensor | None
) -> torch.Tensor | None:
    """(x L_B^T) L_A^T in fp32, t rounded once to L_A's dtype (as the kernel does)."""
    if L_A is None or L_B is None or L_B.shape[0] == 0:
        return None
    t = (x.float() @ L_B.float().T).to(L_A.dtype)
    return t.float() @ L_A.float().T


def w4a8_gemm_reference(
    q_x: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    in_features: int, x: torch.Tensor | None = None, L_A: torch.Tensor | None = None,
    L_B: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch W4A8. q_x: (M, K) int8, s_x: (M, 1), w_packed: (N, ceil(K/8)) int32,
    w_scale: (N, 1), x: (M, K) float (needed when a low-rank term is given). Returns (M, N)."""
    M, K = q_x.shape
    _check_in_features(K, in_features)
    N, _ = _check_common(M, K, w_packed, w_scale, L_A, L_B, bias, "separate")
    q_w = unpack_int4(w_packed, (N, K))
    # float64 is exact here: |q_x q_w| <= 1024, so any K below 2^43 sums without rounding,
    # and it runs on CPU and CUDA alike (integer matmul does not).
    acc = (q_x.double() @ q_w.double().T).float()
    y = acc * s_x.float().reshape(M, 1) * w_scale.float().reshape(1, N)
    lr = _lowrank_reference(x, L_A, L_B) if x is not None else None
    if lr is None and L_B is not None and L_B.shape[0] > 0:
        raise ValueError("a low-rank term needs the unquantized input x")
    if lr is not None:
        y = y + lr
    if bias is not None:
        y = y + bias.float()
    dtype = out_dtype or (x.dtype if x is not None else s_x.dtype)
    return y.to(dtype)


def w4a16_gemm_reference(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
    L_A: torch.Tensor | None = None, L_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch W4A16. x: (M, K) float; the codes are applied in fp32, then the scale."""
    M, K = x.shape
    _check_in_features(K, in_features)
    N, _ = _check_common(M, K, w_packed, w_scale, L_A, L_B, bias, "separate")
    q_w = unpack_int4(w_packed, (N, K))
    y = (x.float() @ q_w.float().T) * w_scale.float().reshape(1, N)
    lr = _lowrank_reference(x, L_A, L_B)
    if lr is not None:
        y = y + lr
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    from aser.kernels.act_quant import round_fp32_to

    @triton.jit
    def _fdot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # The interpreter multiplies bf16 operands as raw uint16 bits; fp32 operands give the
        # same result (a bf16 x bf16 product is exact in fp32, accumulation is fp32 either way).
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _w4_gemm_kernel(
        a_ptr, sa_ptr, w_ptr, sw_ptr, x_ptr, t_ptr, lb_ptr, la_ptr, bias_ptr, y_ptr,
        M, N, K, KW, R,
        A8: tl.constexpr, LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows = offs_m.to(tl.int64)
        cols = offs_n.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        shifts = tl.arange(0, 8) * 4

        if A8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + rows[:, None] * K + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0)
            # One int32 word holds 8 consecutive k; expand (BK/8, BN) words to (BK, BN) codes.
            # Padding nibbles past K decode to -8 but meet a zero activation.
            offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr + cols[None, :] * KW + offs_kw[:, None],
                            mask=(offs_kw[:, None] < KW) & mask_n[None, :], other=0)
            nib = (words[:, None, :] >> shifts[None, :, None]) & 0xF
            q_w = tl.reshape(nib, (BLOCK_K, BLOCK_N)) - 8
            if A8:
                acc += tl.dot(a, q_w.to(tl.int8), out_dtype=tl.int32)
            elif UPCAST:
                acc = _fdot(a, q_w.to(tl.float32), acc, UPCAST, DOT_PRECISION)
            else:
                acc = _fdot(a, q_w.to(a.dtype), acc, UPCAST, DOT_PRECISION)
            if LOWRANK == 2:
                if A8:
                    xf = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :],
                                 mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                else:
                    xf = a
                lb = tl.load(lb_ptr + offs_r[None, :] * K + offs_k[:, None],
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                t = _fdot(xf, lb, t, UPCAST, DOT_PRECISION)

        if A8:
            sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
            y = acc.to(tl.float32) * sa[:, None]
        else:
            y = acc
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
        y = y * sw[None, :]
        if LOWRANK > 0:
            la = tl.load(la_ptr + cols[None, :] * R + offs_r[:, None],
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if LOWRANK == 1:
                tt = tl.load(t_ptr + rows[:, None] * R + offs_r[None, :],
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            else:
                tt = round_fp32_to(t, la.dtype).to(la.dtype)
            y = _fdot(tt, la, y, UPCAST, DOT_PRECISION)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_dtype = y_ptr.dtype.element_ty
        y = round_fp32_to(y, out_dtype)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(out_dtype),
                 mask=mask_m[:, None] & mask_n[None, :])


def _launch(
    a: torch.Tensor, s_a: torch.Tensor | None, w_packed: torch.Tensor, w_scale: torch.Tensor,
    K: int, x: torch.Tensor | None, L_A: torch.Tensor | None, L_B: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype, lowrank_mode: str,
    blocks: GemmBlocks | None, a8: bool,
) -> torch.Tensor:
    M = a.shape[0]
    N, r = _check_common(M, K, w_packed, w_scale, L_A, L_B, bias, lowrank_mode)
    y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return y
    lowrank = _LR_NONE
    t = lb = la = None
    if r > 0:
        if x is None:
            raise ValueError("a low-rank term needs the unquantized input x")
        assert L_A is not None and L_B is not None
        la = L_A.contiguous()
        if lowrank_mode == "separate":
            lowrank = _LR_SEPARATE
            t = (x @ L_B.to(x.dtype).T).to(la.dtype).contiguous()
        else:
            lowrank = _LR_FUSED
            lb = L_B.to(x.dtype).contiguous()
    b = blocks or default_blocks(M, N, K, a8)
    if b.block_k % 8:
        raise ValueError("block_k must be a multiple of 8")
    block_r = max(16, triton.next_power_of_2(r)) if r > 0 else 16
    float_dtype = x.dtype if x is not None else a.dtype
    precision = "ieee" if float_dtype == torch.float32 else "tf32"
    dummy = w_scale
    args = (
        a.contiguous(), s_a.float().reshape(M).contiguous() if s_a is not None else dummy,
        w_packed.contiguous(), w_scale.float().reshape(N).contiguous(),
        x.contiguous() if (x is not None and lowrank == _LR_FUSED) else dummy,
        t if t is not None else dummy, lb if lb is not None else dummy,
        la if la is not None else dummy, bias.contiguous() if bias is not None else dummy, y,
        M, N, K, w_packed.shape[1], r,
    )
    # A default tile that needs more shared memory than this GPU has (the pipelined stages of an
    # fp32 fused low-rank tile: 245,760 bytes against the H200's 232,448, measured) steps down to
    # fewer stages, then half the K block, and the choice is kept for that kernel variant. Tiles
    # the caller chose are launched as they are (the benchmark reports the ones that do not fit).
    key = (a8, lowrank, bias is not None, float_dtype, b, block_r, a.device.index)
    tiles = [_FITTED.get(key, b)] if blocks is None else [b]
    if blocks is None and key not in _FITTED:
        tiles += smaller_tiles(b)
    for i, tile in enumerate(tiles):
        grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n),)
        try:
            _w4_gemm_kernel[grid](
                *args,
                A8=a8, LOWRANK=lowrank, HAS_BIAS=bias is not None,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, BLOCK_R=block_r,
                GROUP_M=tile.group_m, DOT_PRECISION=precision, UPCAST=not a.is_cuda,
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )
        except OutOfResources:
            if i == len(tiles) - 1:
                raise
            continue
        if blocks is None:
            _FITTED[key] = tile
        return y
    raise AssertionError("unreachable")  # pragma: no cover


def w4a8_gemm_triton(
    q_x: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    in_features: int, x: torch.Tensor | None = None, L_A: torch.Tensor | None = None,
    L_B: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, lowrank_mode: LowRankMode = "separate",
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """Triton W4A8; same contract as ``w4a8_gemm_reference``."""
    if q_x.dtype != torch.int8:
        raise ValueError(f"q_x must be int8 codes, got {q_x.dtype}")
    _check_in_features(q_x.shape[1], in_features)
    dtype = out_dtype or (x.dtype if x is not None else s_x.dtype)
    return _launch(q_x, s_x, w_packed, w_scale, in_features, x, L_A, L_B, bias, dtype,
                   lowrank_mode, blocks, a8=True)


def w4a16_gemm_triton(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
    L_A: torch.Tensor | None = None, L_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    lowrank_mode: LowRankMode = "separate", blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """Triton W4A16; same contract as ``w4a16_gemm_reference``."""
    _check_in_features(x.shape[1], in_features)
    return _launch(x, None, w_packed, w_scale, in_features, x, L_A, L_B, bias,
                   out_dtype or x.dtype, lowrank_mode, blocks, a8=False)


def w4a8_gemm(
    q_x: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    in_features: int, x: torch.Tensor | None = None, L_A: torch.Tensor | None = None,
    L_B: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, lowrank_mode: LowRankMode = "separate",
    blocks: GemmBlocks | None = None, backend: Backend = "auto",
) -> torch.Tensor:
    """Dispatcher: Triton on CUDA, the reference elsewhere (``backend`` overrides)."""
    if use_triton(backend, q_x, w_packed):
        return w4a8_gemm_triton(q_x, s_x, w_packed, w_scale, in_features, x, L_A, L_B, bias,
                                out_dtype, lowrank_mode, blocks)
    return w4a8_gemm_reference(q_x, s_x, w_packed, w_scale, in_features, x, L_A, L_B, bias,
                               out_dtype)


def w4a16_gemm(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, in_features: int,
    L_A: torch.Tensor | None = None, L_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    lowrank_mode: LowRankMode = "separate", blocks: GemmBlocks | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dispatcher: Triton on CUDA, the reference elsewhere (``backend`` overrides)."""
    if use_triton(backend, x, w_packed):
        return w4a16_gemm_triton(x, w_packed, w_scale, in_features, L_A, L_B, bias, out_dtype,
                                 lowrank_mode, blocks)
    return w4a16_gemm_reference(x, w_packed, w_scale, in_features, L_A, L_B, bias, out_dtype)
