"""AserLinear against a float64 fake-quantization reference."""

from __future__ import annotations

import pytest
import torch
from kernel_tolerances import rel_err, tol

from aser.kernels.linear import AserLinear
from aser.kernels.quant import dequantize_weight, quantize_activation, quantize_weight


def _fake_quant_reference(x, q, s, L_A, L_B, bias, a_bits):
    """DQ(W) @ Q_a(x) + L_A L_B x + bias in float64; activation codes from quant.py in x's dtype
    (the quantizer every part of the project shares), so both sides see the same codes."""
    if a_bits == 8:
        qa, sa = quantize_activation(x, 8)
        xa = qa.double() * sa.double()
    else:
        xa = x.double()
    y = xa @ dequantize_weight(q, s.double()).T
    if L_A is not None:
        y = y + (x.double() @ L_B.double().T) @ L_A.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def _layer(a_bits: int | None, backend: str, r: int, g: torch.Generator):
    """A (45 x 77) AserLinear of random RTN weights, rank-r adapter and bias, and its pieces."""
    N, K = 45, 77
    W = torch.randn(N, K, generator=g)
    q, s = quantize_weight(W, 4)
    L_A = torch.randn(N, r, generator=g) * 0.1 if r else None
    L_B = torch.randn(r, K, generator=g) * 0.1 if r else None
    bias = torch.randn(N, generator=g)
    lin = AserLinear.from_codes(q, s, L_A=L_A, L_B=L_B, bias=bias, a_bits=a_bits, backend=backend)  # type: ignore[arg-type]
    return lin, q, s, L_A, L_B, bias


@pytest.mark.parametrize("a_bits", [8, None])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("r", [0, 6])
def test_matches_fake_quant(a_bits, backend, r):
    g = torch.Generator().manual_seed(0)
    lin, q, s, L_A, L_B, bias = _layer(a_bits, backend, r, g)
    N, K = lin.out_features, lin.in_features
    x = torch.randn(2, 7, K, generator=g)  # (batch, seq, K): leading dims pass through
    y = lin(x)
    assert y.shape == (2, 7, N) and y.dtype == x.dtype
    ref = _fake_quant_reference(x.reshape(-1, K), q, s, L_A, L_B, bias, a_bits).reshape(2, 7, N)
    assert rel_err(y, ref) <= tol("linear_fp32")
    assert lin.rank == r


@pytest.mark.parametrize("a_bits", [8, None])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_token_gives_nan_output(a_bits, backend):
    """A NaN in one token's activations makes that token's output NaN, not a finite value; the
    other tokens are unaffected. Rank 0: an adapter would carry the NaN on its own."""
    g = torch.Generator().manual_seed(0)
    lin, *_ = _layer(a_bits, backend, 0, g)
    x = torch.randn(4, lin.in_features, generator=g)
    x[1, 30] = float("nan")
    y = lin(x)
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()


def test_validation():
    q = torch.zeros(4, 16, dtype=torch.int8)
    s = torch.ones(4, 1)
    with pytest.raises(ValueError, match="a_bits"):
        AserLinear.from_codes(q, s, a_bits=6)
    with pytest.raises(ValueError, match="together"):
        AserLinear.from_codes(q, s, L_A=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="L_B must be"):
        AserLinear.from_codes(q, s, L_A=torch.zeros(4, 2), L_B=torch.zeros(2, 15))
    with pytest.raises(ValueError, match="words per row"):
        AserLinear(torch.zeros(4, 3, dtype=torch.int32), s, 16)
