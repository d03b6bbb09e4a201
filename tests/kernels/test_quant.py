"""The reference quantizers: round trips, code ranges, and agreement with compressed-tensors."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from aser.kernels import quant

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_weight_round_trip_within_half_step(dtype, bits, group_size):
    torch.manual_seed(0)
    W = (torch.randn(13, 64, dtype=torch.float64) * torch.logspace(-2, 1, 64)).to(dtype)
    q, scale = quant.quantize_weight(W, bits, group_size)
    qmin, qmax = quant.int_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert (scale > 0).all() and scale.dtype == dtype
    err = (quant.dequantize_weight(q, scale, group_size).double() - W.double()).abs()
    g = group_size or 64
    step = scale.double().repeat_interleave(g, dim=1)
    # Half a step, plus the rounding of x/scale in the working dtype (a few ulps of |x|).
    slack = 4 * torch.finfo(dtype).eps * W.double().abs()
    assert (err <= step / 2 + slack).all()


def test_absmax_maps_to_the_convention():
    """absmax/7.5 for INT4: +absmax -> 7 (clamped from 7.5), -absmax -> -8 (7.5 rounds to even)."""
    W = torch.tensor([[1.5, -1.5, 0.0, 0.1]], dtype=torch.float64)
    q, scale = quant.quantize_weight(W, 4)
    assert float(scale) == pytest.approx(1.5 / 7.5)
    assert q.tolist() == [[7, -8, 0, 0]]


def test_zero_rows_get_eps_scale_and_zero_codes():
    W = torch.zeros(3, 8)
    q, scale = quant.quantize_weight(W, 4)
    assert (q == 0).all() and (scale == torch.finfo(torch.float32).eps).all()
    xq, xs = quant.quantize_activation(torch.zeros(2, 5), 8)
    assert (xq == 0).all() and (xs > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_matches_compressed_tensors_exactly(dtype):
    torch.manual_seed(1)
    W = torch.randn(32, 96).to(dtype)
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    scale = quant.weight_scale(W, 4)
    ref = fake_quantize(W, scale, torch.zeros_like(scale), args)
    assert torch.equal(quant.fake_quantize_weight(W, 4), ref)


def test_activation_matches_compressed_tensors_exactly():
    torch.manual_seed(2)
    x = torch.randn(7, 33) * 3
    args = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
    _, scale = quant.quantize_activation(x, 8)
    ref = fake_quantize(x, scale, torch.zeros_like(scale), args)
    assert torch.equal(quant.fake_quantize_activation(x, 8), ref)


def test_activation_per_token_codes_and_scale():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    q, scale = quant.quantize_activation(x, 8)
    assert scale.shape == (2, 5, 1) and q.shape == x.shape and q.dtype == torch.int8
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127.5, rtol=0, atol=0)
    assert ((quant.fake_quantize_activation(x, 8) - x).abs() <= scale / 2 + 1e-15).all()


@pytest.mark.parametrize("K", [1, 7, 8, 33, 4095])
def test_pack_unpack_int4_round_trip(K):
    torch.manual_seed(4)
    q = torch.randint(-8, 8, (5, K), dtype=torch.int8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, (K + 7) // 8)
    assert torch.equal(quant.unpack_int4(packed, (5, K)), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    word = int(quant.pack_int4(q)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [v + 8 for v in q[0].tolist()]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_weight(torch.ones(2, 4), 9)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize_weight(torch.ones(2, 10), 4, group_size=4)
    with pytest.raises(ValueError, match="range"):
        quant.pack_int4(torch.tensor([[9]], dtype=torch.int8))


def test_bit_widths_two_to_eight_and_no_others() -> None:
    assert quant.int_range(2) == (-2, 1) and quant.int_range(8) == (-128, 127)
    for bits in (1, 9):
        with pytest.raises(ValueError, match=rf"bits must be in \[2, 8\], got {bits}"):
            quant.int_range(bits)


def test_group_size_must_be_a_positive_divisor() -> None:
    for g in (0, -4):
        with pytest.raises(ValueError, match=rf"group_size {g} must divide the input size 8"):
            quant.weight_scale(torch.ones(2, 8), 4, g)


def test_per_group_scales_and_codes() -> None:
    W = torch.tensor([[1.5, -0.75, 0.0, 3.0], [0.0, 0.0, -15.0, 7.5]], dtype=torch.float64)
    q, scale = quant.quantize_weight(W, 4, group_size=2)
    assert scale.tolist() == [[0.2, 0.4], [torch.finfo(torch.float64).eps, 2.0]]
    assert q.tolist() == [[7, -4, 0, 7], [0, 0, -8, 4]]  # -0.75/0.2 = -3.75 -> -4; 7.5/2 = 3.75 -> 4
    torch.testing.assert_close(quant.dequantize_weight(q, scale, 2), torch.tensor(
        [[1.4, -0.8, 0.0, 2.8], [0.0, 0.0, -16.0, 8.0]], dtype=torch.float64), rtol=1e-15, atol=0)


def test_fake_quantize_weight_uses_the_groups() -> None:
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * torch.logspace(-1, 1, 32)
    q, scale = quant.quantize_weight(W, 4, 8)
    assert torch.equal(quant.fake_quantize_weight(W, 4, 8), quant.dequantize_weight(q, scale, 8))
    assert not torch.equal(quant.fake_quantize_weight(W, 4, 8), quant.fake_quantize_weight(W, 4))


def test_pack_accepts_the_whole_int4_range_and_nothing_else() -> None:
    edge = torch.tensor([[-8, 7]], dtype=torch.int8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(edge), (1, 2)), edge)
    assert quant.pack_int4(torch.zeros(2, 0, dtype=torch.int8)).shape == (2, 0)
    for bad in ([[-9, 0]], [[0, 8]]):
        with pytest.raises(ValueError, match=r"^pack_int4: codes outside the INT4 range \[-8, 7\]$"):
            quant.pack_int4(torch.tensor(bad, dtype=torch.int8))
    with pytest.raises(ValueError, match="takes int8 codes, got torch.int32"):
        quant.pack_int4(torch.zeros(1, 8, dtype=torch.int32))


def test_scales_divide_by_a_tensor_not_a_python_scalar():
    """On CUDA, PyTorch divides by a Python scalar as a multiplication by its reciprocal (one
    ulp off IEEE division). Seen on an H200: the fp32 reference's activation scales differed
    from the Triton kernel's (IEEE div_rn) in some rows. The reference divides by a tensor, which
    is exact everywhere; here: the div op's divisor is a tensor and the bytes equal true division."""
    from torch.utils._python_dispatch import TorchDispatchMode

    divisors = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.mul):
                divisors.append((func.overloadpacket.__name__, type(args[1]).__name__))
            return func(*args, **(kwargs or {}))

    absmax = torch.rand(64, 1) * 10
    with Spy():
        scale = quant.symmetric_scale(absmax, 8)
    assert divisors and all(d == ("div", "Tensor") for d in divisors[:1]), divisors
    exact = torch.tensor([float(a) / 127.5 for a in absmax.flatten().double()], dtype=torch.float64)
    assert torch.equal(scale.flatten(), exact.float())


def _marlin_oracle(row: list[float]) -> tuple[list[int], float]:
    """vLLM's per_token_quant_int8 in numpy fp32 steps, roundf by hand in float64."""
    import math

    import numpy as np

    x = np.asarray(row, dtype=np.float32)
    absmax = max(np.float32(np.abs(x).max()), np.float32(1e-10))
    v = x * (np.float32(127.0) / absmax)
    return [int(math.copysign(math.floor(abs(float(e)) + 0.5), float(e))) for e in v], float(absmax / np.float32(127.0))


def test_marlin_activation_quantizer_is_vllms_per_token_int8() -> None:
    # Ties round away from zero (2.5 -> 3, -2.5 -> -3; half to even would give 2, -2) and the
    # negative extreme is -127, never -128.
    q, scale = quant.quantize_activation_marlin(torch.tensor([[127.0, 2.5, -2.5, 1.5, 0.49999997], [-127.0, 5.0, 0.0, 0.0, 0.0]]))
    assert q.tolist() == [[127, 3, -3, 2, 0], [-127, 5, 0, 0, 0]] and scale.dtype == torch.float32
    assert scale.flatten().tolist() == [1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 96)).to(dtype)
        x[3] = 0.0  # an all-zero row: absmax floored at 1e-10, codes 0
        q, scale = quant.quantize_activation_marlin(x)
        for i in range(x.shape[0]):
            codes, s = _marlin_oracle(x[i].float().tolist())
            assert q[i].tolist() == codes and scale[i, 0].item() == s
    ct_q, _ = quant.quantize_activation(x.float(), 8)
    assert not torch.equal(ct_q, q)  # a different quantizer from compressed-tensors' (/127.5, half to even)
    fq = quant.fake_quantize_activation(x, 8, style="marlin")
    assert fq.dtype == x.dtype and torch.equal(fq, (q.float() * scale).to(x.dtype))
    with pytest.raises(ValueError, match="INT8 only"):
        quant.fake_quantize_activation(x, 4, style="marlin")
    with pytest.raises(ValueError, match="style must be one of"):
        quant.fake_quantize_activation(x, 8, style="fp8")
