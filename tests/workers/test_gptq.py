"""GPTQ against an unblocked reference sweep, and the cases where its answer is known exactly."""

from __future__ import annotations

import pytest
import torch

from aser.kernels.quant import int_range, quantize_weight, symmetric_scale
from aser.workers.gptq import gptq_quantize


def _problem(N: int = 12, K: int = 24, T: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, T, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, K)[:, None]
    X[1] += 0.8 * X[0]  # correlated channels: error feedback has something to exploit
    return torch.randn(N, K, generator=g, dtype=torch.float64), X @ X.T


def _reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None,
                    damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Frantar et al.'s Algorithm 1 without lazy batching: one column at a time over all of W.

    Written from the paper, not from gptq.py: U = chol(H_damped⁻¹) upper, err_i = (w_i − ŵ_i)/U_ii,
    W[:, i:] −= err_i U[i, i:]. Scales: per row from the whole W, or at each group's first column.
    """
    W = W.clone()
    K = W.shape[1]
    Hd = H + damp * float(torch.diagonal(H).mean()) * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    qmin, qmax = int_range(bits)
    g = group_size or K
    scales = []
    Q = torch.zeros(W.shape, dtype=torch.int8)
    for i in range(K):
        if i % g == 0:
            s = symmetric_scale(W[:, i : i + g].abs().amax(dim=1), bits)
            scales.append(s)
        q = torch.round(torch.clamp(W[:, i] / s, qmin, qmax))
        Q[:, i] = q.to(torch.int8)
        err = (W[:, i] - q * s) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q, torch.stack(scales, dim=1)


@pytest.mark.parametrize("group_size,block_size", [(None, 5), (None, 128), (8, 4), (8, 16), (4, 128)])
def test_blocked_sweep_equals_the_unblocked_reference(group_size: int | None, block_size: int) -> None:
    W, H = _problem()
    q, scale = gptq_quantize(W, H, 4, group_size=group_size, damp=0.05, block_size=block_size)
    q_ref, scale_ref = _reference_gptq(W, H, 4, group_size, damp=0.05)
    # Same arithmetic in a different order (blocked updates): scales agree to fp64 rounding, and
    # codes exactly (a code flip would need a value within ~1e-15 of a rounding boundary).
    torch.testing.assert_close(scale, scale_ref, rtol=1e-12, atol=0)
    assert torch.equal(q, q_ref)
    assert scale.shape == (W.shape[0], 1 if group_size is None else W.shape[1] // group_size)


def test_diagonal_hessian_means_no_error_feedback_so_codes_are_rtn() -> None:
    """With uncorrelated inputs (H diagonal) an error cannot be compensated: GPTQ is RTN."""
    W, _ = _problem(seed=1)
    H = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).repeat(W.shape[1] // 3))  # 1.0 is not "dead"
    for group_size in (None, 8):
        q, scale = gptq_quantize(W, H, 3, group_size=group_size, block_size=7)
        q_rtn, scale_rtn = quantize_weight(W, 3, group_size)
        assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn)


def test_error_feedback_lowers_the_output_error() -> None:
    g = torch.Generator().manual_seed(2)
    K = 24
    # Inputs near a rank-6 subspace: a column's rounding error can be undone by its neighbours.
    Z = torch.randn(6, 200, generator=g, dtype=torch.float64)
    X = torch.randn(K, 6, generator=g, dtype=torch.float64) @ Z + 0.1 * torch.randn(K, 200, generator=g, dtype=torch.float64)
    H, W = X @ X.T, torch.randn(12, K, generator=g, dtype=torch.float64)
    q, scale = gptq_quantize(W, H, 4)
    q_rtn, _ = quantize_weight(W, 4)

    def out_err(codes: torch.Tensor) -> float:
        D = W - codes.double() * scale
        return float(((D @ H) * D).sum())

    assert out_err(q) < 0.5 * out_err(q_rtn)  # measured 0.17 on this problem


def test_dead_inputs_get_zero_codes_and_do_not_break_the_factorisation() -> None:
    W, H = _problem(seed=3)
    H[:, [2, 5]] = 0.0
    H[[2, 5], :] = 0.0  # channels 2 and 5 never fire
    q, scale = gptq_quantize(W, H, 4)
    assert (q[:, [2, 5]] == 0).all() and (q[:, [0, 1, 3]] != 0).any()
    # scales come from the live columns only (the dead columns' weights are zeroed first)
    live = torch.ones(W.shape[1], dtype=torch.bool)
    live[[2, 5]] = False
    torch.testing.assert_close(scale[:, 0], symmetric_scale(W[:, live].abs().amax(1), 4), rtol=0, atol=0)
    assert torch.isfinite(scale).all()


def test_scales_are_rounded_through_the_stored_dtype() -> None:
    W, H = _problem(seed=4)
    for group_size in (None, 8):
        q, scale = gptq_quantize(W, H, 4, group_size=group_size, scale_dtype=torch.bfloat16)
        assert scale.dtype == torch.float64
        assert torch.equal(scale, scale.to(torch.bfloat16).to(torch.float64))
        plain = gptq_quantize(W, H, 4, group_size=group_size)[1]
        assert not torch.equal(scale, plain)  # the rounding really happened


def test_default_damping_is_one_percent_of_the_mean_diagonal() -> None:
    W, H = _problem(seed=5)
    assert torch.equal(gptq_quantize(W, H, 4)[0], gptq_quantize(W, H, 4, damp=1e-2)[0])
    assert torch.equal(gptq_quantize(W, H, 4)[0], _reference_gptq(W, H, 4, None, damp=1e-2)[0])


def test_group_size_must_divide_k() -> None:
    W, H = _problem()
    with pytest.raises(ValueError, match="group_size 5 must divide K=24"):
        gptq_quantize(W, H, 4, group_size=5)


@pytest.mark.parametrize("bits", [2, 4])
def test_error_feedback_past_the_row_scale_is_clamped_at_both_ends(bits: int) -> None:
    """The row scale comes from the weights before the sweep; error feedback can push a later
    column a whole step past ±absmax (here: input 0 is 4x input 1 and they are 99 % correlated,
    so column 0's rounding error moves column 1 by about 1.8 steps). Codes stay in range."""
    qmin, qmax = int_range(bits)
    a = 4.0
    H = torch.tensor([[a * a, 0.99 * a], [0.99 * a, 1.0]], dtype=torch.float64)
    edge = qmax + 0.5  # the row's absmax in units of its scale
    W = torch.tensor([[-0.45, -edge], [0.45, edge]], dtype=torch.float64)
    Q, _ = gptq_quantize(W, H, bits, damp=1e-6)
    assert Q[:, 1].tolist() == [qmin, qmax]  # without either clamp: qmin - 1 or qmax + 1
