"""Per-token INT8 activation quantization: the Triton kernel (interpreter on CPU) against the torch
reference bit for bit and both against float64 math; the dispatch decision; NaN handling."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import triton
import triton.language as tl
from dispatch_spy import DISPATCH_CASES, pretend_cuda, record_routes
from kernel_tolerances import max_abs_diff, tol

from aser.kernels import act_quant, backend
from aser.kernels.act_quant import (
    QuantizedActivation,
    quantize_activation_int8,
    quantize_activation_int8_reference,
    quantize_activation_int8_triton,
    round_fp32_to,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (7, 100), (13, 4095)]
IMPLS: dict[str, Callable[..., QuantizedActivation]] = {
    "triton": quantize_activation_int8_triton,
    "torch": quantize_activation_int8_reference,
}


def _x(M: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    x[:, : min(3, K)] *= 40  # outlier channels, as in real activations
    return x.to(dtype)


def _m(K: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(K, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).to(dtype)


def _assert_same(a: QuantizedActivation, b: QuantizedActivation) -> None:
    """Codes, scales and smoothed input within tol("act_quant"), which is 0: bit for bit."""
    assert max_abs_diff(a.q, b.q) <= tol("act_quant")
    assert a.scale.dtype == b.scale.dtype and max_abs_diff(a.scale, b.scale) <= tol("act_quant")
    if a.smoothed is None:
        assert b.smoothed is None
    else:
        assert b.smoothed is not None and max_abs_diff(a.smoothed, b.smoothed) <= tol("act_quant")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", SHAPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_triton_matches_reference_bit_for_bit(dtype, M, K, smooth):
    x = _x(M, K, dtype)
    m = _m(K, dtype) if smooth else None
    _assert_same(quantize_activation_int8_triton(x, m), quantize_activation_int8_reference(x, m))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_and_constant_rows(dtype):
    x = torch.zeros(4, 37, dtype=dtype)
    c = 127.5 / 64  # scale c / 127.5 = 1/64 is exact, so +-c lands exactly on +-127.5
    x[1] = c
    x[2] = -c
    x[3, 5] = 1.0
    out = quantize_activation_int8_triton(x)
    _assert_same(out, quantize_activation_int8_reference(x))
    eps = torch.finfo(dtype).eps
    assert out.scale[0, 0] == eps and not out.q[0].any()
    # +127.5 clamps to 127; -127.5 rounds half to even, to -128.
    assert (out.q[1] == 127).all() and (out.q[2] == -128).all()
    assert out.q[3, 5] == 127 and out.q[3].abs().sum() == 127


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,K", SHAPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_against_float64(impl, M, K, smooth):
    """Both implementations against the same math in float64: codes equal the float64 codes
    except at near-ties, and dequantize to within half a step of x / m; scales positive."""
    x = _x(M, K, torch.float32)
    m = _m(K, torch.float32) if smooth else None
    out = IMPLS[impl](x, m)
    xs64 = x.double() / m.double() if m is not None else x.double()
    s64 = xs64.abs().amax(dim=1, keepdim=True) / 127.5
    v64 = xs64 / s64
    q64 = torch.round(v64.clamp(-128, 127))
    # fp32 rounds x / m, the scale and x / scale (a few 2^-24 relative each): |v - v64| < 1e-4
    # for |v| <= 127.5, so a code may differ only where v64 is that close to a half-integer.
    near_tie = ((v64 - v64.floor()) - 0.5).abs() < 1e-4
    diff = out.q.double() - q64
    assert ((diff == 0) | ((diff.abs() == 1) & near_tie)).all()
    assert (out.scale > 0).all() and int(out.q.min()) >= -128 and int(out.q.max()) <= 127
    # The fp32 scale is absmax / 127.5 rounded (relative 2^-24); 127 steps of it add 127 * 2^-24
    # relative to half a step, ~1.5e-5.
    deq = out.q.double() * out.scale.double()
    assert ((deq - xs64).abs() <= 0.5 * out.scale.double() * (1 + 1e-4)).all()


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("on_cuda,requested,expected", DISPATCH_CASES)
def test_dispatch_decision(monkeypatch, smooth, on_cuda, requested, expected):
    x = _x(7, 100, torch.float32)
    m = _m(100, torch.float32) if smooth else None
    if on_cuda:
        pretend_cuda(monkeypatch, x, *([m] if m is not None else []))
    calls = record_routes(monkeypatch, act_quant, "quantize_activation_int8_triton",
                          "quantize_activation_int8_reference")
    quantize_activation_int8(x, m, backend=requested)
    assert calls == [expected]


def test_auto_needs_every_tensor_on_cuda_and_triton(monkeypatch):
    """Mixed devices, or no Triton installed, fall back to the reference."""
    x, m = _x(7, 100, torch.float32), _m(100, torch.float32)
    calls = record_routes(monkeypatch, act_quant, "quantize_activation_int8_triton",
                          "quantize_activation_int8_reference")
    pretend_cuda(monkeypatch, x)
    quantize_activation_int8(x, m)
    pretend_cuda(monkeypatch, x, m)
    monkeypatch.setattr(backend, "HAS_TRITON", False)
    quantize_activation_int8(x, m)
    assert calls == ["torch", "torch"]


def test_bad_smooth_shape():
    with pytest.raises(ValueError, match="smooth"):
        quantize_activation_int8(torch.ones(2, 8), torch.ones(7))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True])
def test_nan_makes_its_row_nan(impl, dtype, smooth):
    """A NaN activation makes its row's scale NaN, so the dequantized row is NaN; it never
    becomes a finite code. Rows without NaN are untouched (bit for bit as without the NaN)."""
    x = _x(5, 300, dtype)
    x[1, 7] = float("nan")  # not the row's absmax (an outlier channel is)
    x[3, 0] = float("nan")  # in place of the row's absmax
    m = _m(300, dtype) if smooth else None
    out = IMPLS[impl](x, m)
    assert out.scale[[1, 3]].isnan().all()
    assert (out.q[[1, 3]].to(dtype) * out.scale[[1, 3]]).isnan().all()
    if out.smoothed is not None:
        assert out.smoothed[1, 7].isnan() and out.smoothed[3, 0].isnan()
    clean = [0, 2, 4]
    ref = quantize_activation_int8_reference(x[clean], None if m is None else m)
    _assert_same(QuantizedActivation(out.q[clean], out.scale[clean],
                                     None if out.smoothed is None else out.smoothed[clean]), ref)


@triton.jit
def _round_to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, round_fp32_to(x, tl.bfloat16), mask=offs < n)


def test_round_fp32_to_bf16_keeps_nan_and_rounds_like_torch():
    """The interpreter's bit-twiddling round to bf16: every NaN payload stays NaN (0x7FFFFFFF
    plus the rounding increment would carry into the sign bit: -0.0), and finite values round
    half to even exactly as torch's cast (ties, the largest finite value, infinities)."""
    patterns = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8001, 0xFFFF8000, 0x7FC00000, 0x7F800001,
                0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x00000001]
    bits = torch.tensor(patterns, dtype=torch.int64).to(torch.uint32).view(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(40, generator=torch.Generator().manual_seed(0))])
    y = torch.empty_like(x)
    _round_to_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=64)
    expected = x.to(torch.bfloat16).float()
    assert (y.isnan() == x.isnan()).all()
    same = (y == expected) & (y.signbit() == expected.signbit())
    assert (same | x.isnan()).all()
