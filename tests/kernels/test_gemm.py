"""W4A8 / W4A16 GEMMs with the low-rank epilogue: Triton (interpreter on CPU) vs the torch
reference vs exact float64 math, on odd shapes, plus exact INT32 accumulation."""

from __future__ import annotations

import pytest
import torch
from dispatch_spy import DISPATCH_CASES, pretend_cuda, record_routes
from kernel_tolerances import max_abs_diff, rel_err, tol

from aser.kernels import gemm
from aser.kernels.act_quant import quantize_activation_int8_reference
from aser.kernels.gemm import (
    GemmBlocks,
    w4a8_gemm,
    w4a8_gemm_reference,
    w4a8_gemm_triton,
    w4a16_gemm,
    w4a16_gemm_reference,
    w4a16_gemm_triton,
)
from aser.kernels.quant import pack_int4, quantize_weight

# (M, N, K, r): M in {1, 7, 13}; N, K off every block size; K = 4095 with a small N to keep the
# interpreter's cost down.
SHAPES = [(1, 24, 40, 0), (7, 70, 100, 5), (13, 33, 4095, 3), (13, 130, 257, 20), (7, 17, 9, 1)]
DTYPES = [torch.float32, torch.bfloat16]
_TOL = {torch.float32: ("gemm_fp32", "float64_fp32"), torch.bfloat16: ("gemm_bf16", "float64_bf16")}


def _case(M, N, K, r, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    q, s = quantize_weight(W, 4)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    L_A = (torch.randn(N, r, generator=g) * 0.1).to(dtype) if r else None
    L_B = (torch.randn(r, K, generator=g) * 0.1).to(dtype) if r else None
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return q, pack_int4(q), s.to(dtype), x, L_A, L_B, b


def _float64(a_codes, a_scale, q, s, x, L_A, L_B, b):
    """The math, exactly: dequantized operands in float64."""
    y = (a_codes.double() * a_scale.double()) @ (q.double() * s.double()).T
    if L_A is not None:
        y = y + (x.double() @ L_B.double().T) @ L_A.double().T
    if b is not None:
        y = y + b.double()
    return y


def _assert_close(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel against the reference, and each of them against exact float64 math."""
    t_kernel, t_f64 = _TOL[dtype]
    assert rel_err(out, ref) <= tol(t_kernel)
    assert rel_err(ref, exact) <= tol(t_f64)
    assert rel_err(out, exact) <= tol(t_f64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("mode", ["separate", "fused"])
def test_w4a8(M, N, K, r, dtype, mode):
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, dtype)
    qa = quantize_activation_int8_reference(x)
    ref = w4a8_gemm_reference(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b)
    out = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, lowrank_mode=mode)
    assert out.dtype == dtype and out.shape == (M, N)
    _assert_close(out, ref, _float64(qa.q, qa.scale, q, s, x, L_A, L_B, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("mode", ["separate", "fused"])
def test_w4a16(M, N, K, r, dtype, mode):
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, dtype)
    ref = w4a16_gemm_reference(x, packed, s, K, L_A, L_B, b)
    out = w4a16_gemm_triton(x, packed, s, K, L_A, L_B, b, lowrank_mode=mode)
    assert out.dtype == dtype and out.shape == (M, N)
    _assert_close(out, ref, _float64(x, torch.ones(M, 1), q, s, x, L_A, L_B, b), dtype)


@pytest.mark.parametrize("worst_case", [True, False])
def test_int32_accumulation_is_exact(worst_case):
    """Unit scales, rank 0: the fp32 output is the integer dot product itself (|acc| < 2^24)."""
    M, N, K = 7, 20, 4095
    g = torch.Generator().manual_seed(3)
    if worst_case:  # every product at its maximum, 4095 * 1024 = 4.2e6
        a = torch.full((M, K), -128, dtype=torch.int8)
        q = torch.full((N, K), -8, dtype=torch.int8)
        q[1::2] = 7
    else:
        a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
        q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    exact = a.long() @ q.long().T
    out = w4a8_gemm_triton(a, torch.ones(M, 1), pack_int4(q), torch.ones(N, 1), K,
                           out_dtype=torch.float32)
    assert max_abs_diff(out, exact) <= tol("int32_accumulation")
    ref = w4a8_gemm_reference(a, torch.ones(M, 1), pack_int4(q), torch.ones(N, 1), K,
                              out_dtype=torch.float32)
    assert max_abs_diff(ref, exact) <= tol("int32_accumulation")


@pytest.mark.parametrize("kind", ["w4a8", "w4a16"])
def test_zero_and_constant_rows(kind):
    M, N, K, r = 3, 40, 50, 4
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, torch.float32)
    x[0] = 0.0
    x[1] = 0.75
    if kind == "w4a8":
        qa = quantize_activation_int8_reference(x)
        out = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b)
        ref = w4a8_gemm_reference(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b)
    else:
        out = w4a16_gemm_triton(x, packed, s, K, L_A, L_B, b)
        ref = w4a16_gemm_reference(x, packed, s, K, L_A, L_B, b)
    assert torch.equal(out[0], b)  # a zero token leaves exactly the bias
    assert rel_err(out, ref) <= tol("gemm_fp32")


@pytest.mark.parametrize("kind", ["w4a8", "w4a16"])
def test_rank_zero_equals_no_lowrank(kind):
    M, N, K = 5, 30, 70
    q, packed, s, x, _, _, b = _case(M, N, K, 0, torch.float32)
    empty_A, empty_B = torch.zeros(N, 0), torch.zeros(0, K)
    if kind == "w4a8":
        qa = quantize_activation_int8_reference(x)
        plain = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, None, None, b)
        zero = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, empty_A, empty_B, b)
    else:
        plain = w4a16_gemm_triton(x, packed, s, K, None, None, b)
        zero = w4a16_gemm_triton(x, packed, s, K, empty_A, empty_B, b)
    assert torch.equal(plain, zero)


def test_block_shapes_do_not_change_the_result():
    M, N, K, r = 13, 70, 300, 5
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, torch.float32)
    qa = quantize_activation_int8_reference(x)
    a = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, blocks=GemmBlocks(16, 16, 32))
    c = w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, blocks=GemmBlocks(32, 64, 128, group_m=2))
    assert rel_err(a, c) <= tol("gemm_fp32")


@pytest.mark.parametrize("kind", ["w4a8", "w4a16"])
@pytest.mark.parametrize("on_cuda,requested,expected", DISPATCH_CASES)
def test_dispatch_decision(monkeypatch, kind, on_cuda, requested, expected):
    M, N, K, r = 4, 16, 24, 2
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, torch.float32)
    qa = quantize_activation_int8_reference(x)
    if on_cuda:
        pretend_cuda(monkeypatch, qa.q, qa.scale, packed, s, x, L_A, L_B, b)
    calls = record_routes(monkeypatch, gemm, f"{kind}_gemm_triton", f"{kind}_gemm_reference")
    if kind == "w4a8":
        w4a8_gemm(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, backend=requested)
    else:
        w4a16_gemm(x, packed, s, K, L_A, L_B, b, backend=requested)
    assert calls == [expected]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["separate", "fused"])
def test_nan_input_gives_a_nan_row(impl, dtype, mode):
    """A NaN in one token's input makes exactly that output row NaN (W4A8: through the NaN
    activation scale; W4A16 and the low-rank term: through the products), never zeros."""
    M, N, K, r = 5, 33, 70, 3
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, dtype)
    x[2, 11] = float("nan")
    qa = quantize_activation_int8_reference(x)
    if impl == "triton":
        outs = [w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, lowrank_mode=mode),
                w4a16_gemm_triton(x, packed, s, K, L_A, L_B, b, lowrank_mode=mode)]
    else:
        outs = [w4a8_gemm_reference(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b),
                w4a16_gemm_reference(x, packed, s, K, L_A, L_B, b)]
    for y in outs:
        assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()


def test_validation():
    M, N, K, r = 4, 16, 24, 2
    q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, torch.float32)
    qa = quantize_activation_int8_reference(x)
    with pytest.raises(ValueError, match="in_features"):
        w4a16_gemm(x, packed, s, K + 8)
    with pytest.raises(ValueError, match="words per row"):
        w4a16_gemm(x, packed[:, :-1], s, K)
    with pytest.raises(ValueError, match="together"):
        w4a16_gemm(x, packed, s, K, L_A, None)
    with pytest.raises(ValueError, match="lowrank_mode"):
        w4a16_gemm(x, packed, s, K, L_A, L_B, lowrank_mode="both", backend="triton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unquantized input"):
        w4a8_gemm(qa.q, qa.scale, packed, s, K, None, L_A, L_B)
    with pytest.raises(ValueError, match="backend"):
        w4a16_gemm(x, packed, s, K, backend="cuda")  # type: ignore[arg-type]


def test_default_tile_steps_down_when_it_does_not_fit_shared_memory(monkeypatch):
    """Measured on an H200: the default fp32 fused-low-rank tile at M = 2048 needs 245,760 bytes
    of shared memory (the limit is 232,448) and failed to launch. The launcher now retries the
    default tile with fewer stages (then half the K block) and remembers the choice; a tile the
    caller chose is launched as it is."""
    from triton.runtime.errors import OutOfResources

    real = gemm._w4_gemm_kernel
    launches: list[tuple[int, int]] = []

    class TooBigForThreeStages:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((kw["num_stages"], kw["BLOCK_K"]))
                if kw["num_stages"] >= 3:
                    raise OutOfResources(245760, 232448, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(gemm, "_w4_gemm_kernel", TooBigForThreeStages())
    monkeypatch.setattr(gemm, "_FITTED", {})
    q, packed, s, x, L_A, L_B, b = _case(7, 70, 100, 5, torch.float32)
    qa = quantize_activation_int8_reference(x)
    ref = w4a8_gemm_reference(qa.q, qa.scale, packed, s, 100, x, L_A, L_B, b)
    out = w4a8_gemm_triton(qa.q, qa.scale, packed, s, 100, x, L_A, L_B, b, lowrank_mode="fused")
    assert rel_err(out, ref) <= tol("gemm_fp32")
    assert launches == [(3, 128), (2, 128)]
    # The fitted tile is remembered: the next call launches it first.
    w4a8_gemm_triton(qa.q, qa.scale, packed, s, 100, x, L_A, L_B, b, lowrank_mode="fused")
    assert launches[2:] == [(2, 128)]
    # An explicit tile is the caller's choice: no silent substitute.
    with pytest.raises(OutOfResources):
        w4a8_gemm_triton(qa.q, qa.scale, packed, s, 100, x, L_A, L_B, b, lowrank_mode="fused",
                         blocks=GemmBlocks(16, 64, 128, num_stages=3))


def test_smaller_tiles_order():
    b = GemmBlocks(128, 128, 128, num_stages=3)
    assert [(t.num_stages, t.block_k) for t in gemm.smaller_tiles(b)] == [(2, 128), (1, 128), (2, 64), (1, 64)]
    assert [(t.num_stages, t.block_k) for t in gemm.smaller_tiles(GemmBlocks(16, 16, 16, num_stages=2))] == [(1, 16)]
