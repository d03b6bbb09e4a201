"""Reference quantizers: the numerics every other part of the project must match.

Convention (compressed-tensors 0.19+, so that a checkpoint loaded by transformers reproduces
our simulation exactly): symmetric INT-b, ``scale = absmax / ((qmax - qmin) / 2)`` (absmax/7.5
for INT4, absmax/127.5 for INT8), ``q = round(clamp(x / scale, qmin, qmax))`` with
round-half-to-even, a zero scale replaced by the dtype's eps. All functions are pure torch and
work in the input's float dtype (float64 included); codes are int8.
"""

from __future__ import annotations

import torch

# compressed-tensors is imported where it is used: importing it costs about 3 s of CPU here
# (it pulls in torch._dynamo and torch.distributed), paid by every Ray worker process that
# imports this module only to build layers or compute statistics.

MIN_BITS, MAX_BITS = 2, 8


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of symmetric signed INT-b: (-2^(b-1), 2^(b-1) - 1)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale for values with the given absolute maximum; never zero (eps of the dtype)."""
    qmin, qmax = int_range(bits)
    # The divisor as a tensor: PyTorch's CUDA division by a Python scalar multiplies by its
    # reciprocal ("may lose one bit of precision", BinaryDivTrueKernel.cu), so on an H200 the
    # fp32 reference scales missed IEEE division, and the Triton kernel's div_rn, by an ulp in
    # some rows. A tensor divisor divides exactly on every device (identical bytes on the CPU).
    scale = absmax / torch.full((), (qmax - qmin) / 2, dtype=absmax.dtype, device=absmax.device)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def _round_codes(x_scaled: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = int_range(bits)
    return torch.round(torch.clamp(x_scaled, qmin, qmax))


def _check_groups(K: int, group_size: int | None) -> int:
    if group_size is None:
        return K
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size {group_size} must divide the input size {K}")
    return group_size


def weight_scale(W: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Per-output-channel (group_size None) or per-group scales.

    W: (N=out, K=in) float. Returns (N, 1) or (N, K // group_size), dtype of W.
    """
    N, K = W.shape
    g = _check_groups(K, group_size)
    absmax = W.reshape(N, K // g, g).abs().amax(dim=-1)
    return symmetric_scale(absmax, bits)


def quantize_weight(
    W: torch.Tensor, bits: int, group_size: int | None = None, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT-b weight codes and scales.

    W: (N, K) float. Returns q: (N, K) int8 in [qmin, qmax], scale: (N, K // g) of W's dtype.
    A given ``scale`` (e.g. from GPTQ, which fixes scales before it updates W) is used as is.
    """
    N, K = W.shape
    g = _check_groups(K, group_size)
    if scale is None:
        scale = weight_scale(W, bits, group_size)
    Wg = W.reshape(N, K // g, g)
    q = _round_codes(Wg / scale.unsqueeze(-1), bits)
    return q.reshape(N, K).to(torch.int8), scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """q: (N, K) int8, scale: (N, K // g). Returns (N, K) in scale's dtype."""
    N, K = q.shape
    g = _check_groups(K, group_size)
    return (q.reshape(N, K // g, g).to(scale.dtype) * scale.unsqueeze(-1)).reshape(N, K)


def fake_quantize_weight(
    W: torch.Tensor, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """dequantize(quantize(W)): (N, K) in W's dtype."""
    q, scale = quantize_weight(W, bits, group_size)
    return dequantize_weight(q, scale, group_size)


def quantize_activation(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization over the last dimension.

    x: (..., K) float. Returns q: (..., K) int8 and scale: (..., 1) in x's dtype.
    """
    scale = symmetric_scale(x.abs().amax(dim=-1, keepdim=True), bits)
    return _round_codes(x / scale, bits).to(torch.int8), scale


def quantize_activation_marlin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM Marlin's INT8 input (``VLLM_MARLIN_INPUT_DTYPE=int8``: ``marlin_quant_input`` ->
    ``per_token_quant_int8``, vllm/model_executor/layers/quantization/utils/int8_utils.py).

    Per token, in fp32 whatever x's dtype: ``absmax = max(|x|, 1e-10)``, codes ``roundf(x * (127
    / absmax))`` (CUDA roundf: half away from zero; within ±127 by construction, no -128) and
    scale ``absmax / 127`` kept in fp32. This differs from compressed-tensors' dynamic INT8
    (``quantize_activation``: absmax / 127.5, -128..127, half to even, in x's dtype). On a GPU,
    Triton's fp32 ``127 / absmax`` is the fast division (within 2 ulp), so a code exactly at a
    tie may differ there; nothing else does.

    x: (..., K) float. Returns q: (..., K) int8 and scale: (..., 1) float32.
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10)
    v = xf * (torch.full((), 127.0, device=x.device) / absmax)
    whole = torch.trunc(v)  # v - whole is exact in fp32 for |v| <= 127
    q = whole + torch.where((v - whole).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))
    return q.to(torch.int8), absmax / torch.full((), 127.0, device=x.device)


ACT_QUANT_STYLES = ("compressed-tensors", "marlin")


def fake_quantize_activation(x: torch.Tensor, bits: int, style: str = "compressed-tensors") -> torch.Tensor:
    """dequantize(quantize(x)) per token, in x's dtype. ``style``: whose INT8 quantizer
    (``marlin``: ``quantize_activation_marlin``, 8 bits only)."""
    if style == "marlin":
        if bits != 8:
            raise ValueError(f"the marlin activation quantizer is INT8 only, got {bits} bits")
        qm, sm = quantize_activation_marlin(x)
        return (qm.float() * sm).to(x.dtype)
    if style != "compressed-tensors":
        raise ValueError(f"activation quantizer style must be one of {ACT_QUANT_STYLES}, got {style!r}")
    q, scale = quantize_activation(x, bits)
    return q.to(x.dtype) * scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack INT4 codes (N, K) int8 into (N, ceil(K / 8)) int32, compressed-tensors layout.

    Element k of a row sits in word k // 8 at bits 4 * (k % 8), stored as q + 8 (unsigned).
    Delegates to compressed-tensors so the layout is the one vLLM and transformers read.
    """
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 codes, got {q.dtype}")
    qmin, qmax = int_range(4)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError("pack_int4: codes outside the INT4 range [-8, 7]")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q, num_bits=4, packed_dim=1)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_int4: (N, ceil(K / 8)) int32 -> (N, K) int8."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits=4, shape=torch.Size(shape), packed_dim=1)
