"""Per-token INT8 activation quantization: Triton (interpreter on CPU) vs the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_tolerances import tol

from aser.kernels.act_quant import (
    quantize_activation_int8,
    quantize_activation_int8_reference,
    quantize_activation_int8_triton,
)
from aser.kernels.backend import use_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (7, 100), (13, 4095)]


def _x(M: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    x[:, : min(3, K)] *= 40  # outlier channels, as in real activations
    return x.to(dtype)


def _assert_same(a, b) -> None:
    assert tol("act_quant") == 0.0
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.scale, b.scale)
    if a.smoothed is None:
        assert b.smoothed is None
    else:
        assert torch.equal(a.smoothed, b.smoothed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", SHAPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_triton_matches_reference_bit_for_bit(dtype, M, K, smooth):
    x = _x(M, K, dtype)
    m = (torch.rand(K, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).to(dtype) if smooth else None
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


@pytest.mark.parametrize("M,K", SHAPES)
def test_against_float64(M, K):
    """Codes dequantize to within half a step of x (the 127.5 convention puts absmax exactly
    on the half step, clamped to 127), in range, scales positive."""
    x = _x(M, K, torch.float32)
    out = quantize_activation_int8_triton(x)
    deq = out.q.double() * out.scale.double()
    assert (out.scale > 0).all()
    assert int(out.q.min()) >= -128 and int(out.q.max()) <= 127
    # The fp32 scale is absmax / 127.5 rounded (relative 2^-24); 127 steps of it add 127 * 2^-24
    # relative to half a step, ~1.5e-5.
    bound = 0.5 * out.scale.double() * (1 + 1e-4)
    assert ((deq - x.double()).abs() <= bound).all()


def test_dispatcher_uses_reference_on_cpu():
    x = _x(7, 100, torch.float32)
    assert not use_triton("auto", x)
    _assert_same(quantize_activation_int8(x), quantize_activation_int8_reference(x))
    _assert_same(quantize_activation_int8(x, backend="triton"), quantize_activation_int8_reference(x))


def test_bad_smooth_shape():
    with pytest.raises(ValueError, match="smooth"):
        quantize_activation_int8(torch.ones(2, 8), torch.ones(7))
