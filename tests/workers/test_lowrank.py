import pytest
import torch

from aser.kernels.quant import fake_quantize_weight
from aser.workers.lowrank import (
    damped_cholesky,
    l2qer_lowrank,
    output_error_sq,
    plain_lowrank,
    whitened_lowrank,
)


def _problem(N=24, K=40, T=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, T, generator=g, dtype=torch.float64) * torch.logspace(-1, 1.5, K)[:, None]
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    E = W - fake_quantize_weight(W, 4)
    return E, X @ X.T, X


def test_whitened_error_is_the_tail_of_singular_values():
    E, G, _ = _problem()
    lr = whitened_lowrank(E, G, 8, damp=1e-12, svd="exact")
    resid = output_error_sq(E - lr.L_A @ lr.L_B, G)
    assert resid == pytest.approx(float((lr.sigma[8:] ** 2).sum()), rel=1e-6)


def test_error_non_increasing_in_rank_and_full_rank_is_zero():
    E, G, _ = _problem()
    errs = []
    for r in range(0, 25, 4):
        if r == 0:
            errs.append(output_error_sq(E, G))
            continue
        lr = whitened_lowrank(E, G, r, damp=1e-12, svd="exact")
        errs.append(output_error_sq(E - lr.L_A @ lr.L_B, G))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:]))
    full = whitened_lowrank(E, G, 24, damp=1e-12, svd="exact")
    assert output_error_sq(E - full.L_A @ full.L_B, G) <= 1e-18 * errs[0] + 1e-20


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_whitened_beats_plain_and_l2qer_in_output_error(rank):
    E, G, X = _problem(seed=rank)
    w = whitened_lowrank(E, G, rank, damp=1e-12, svd="exact")
    p = plain_lowrank(E, rank, svd="exact")
    l2 = l2qer_lowrank(E, X.abs().mean(1), rank, svd="exact")
    ew = output_error_sq(E - w.L_A @ w.L_B, G)
    assert ew <= output_error_sq(E - p.L_A @ p.L_B, G) * (1 + 1e-9)
    assert ew <= output_error_sq(E - l2.L_A @ l2.L_B, G) * (1 + 1e-9)


def test_plain_svd_is_frobenius_optimal():
    E, _, _ = _problem()
    p = plain_lowrank(E, 5, svd="exact")
    s = torch.linalg.svdvals(E)
    assert float(((E - p.L_A @ p.L_B) ** 2).sum()) == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-9)


def test_randomized_svd_within_tolerance_of_exact():
    E, G, _ = _problem(N=96, K=200, T=800, seed=3)
    ex = whitened_lowrank(E, G, 8, svd="exact")
    rd = whitened_lowrank(E, G, 8, svd="randomized", niter=4, oversample=16)
    e_ex = output_error_sq(E - ex.L_A @ ex.L_B, G)
    e_rd = output_error_sq(E - rd.L_A @ rd.L_B, G)
    # Randomized range finder with 4 power iterations: residual within 1 % of the optimum.
    assert e_ex <= e_rd * (1 + 1e-9) and e_rd <= 1.01 * e_ex
    # and it is deterministic (fixed seed): same inputs, same bytes
    rd2 = whitened_lowrank(E, G, 8, svd="randomized", niter=4, oversample=16)
    assert torch.equal(rd.L_A, rd2.L_A) and torch.equal(rd.L_B, rd2.L_B)


def test_cholesky_escalates_damping_and_reports_it():
    G = torch.eye(10, dtype=torch.float64)
    G[0, 0] = -3.0  # indefinite, mean diagonal 0.6: needs λ·0.6 > 3
    S, lam, tries = damped_cholesky(G, 1e-2)
    assert tries > 1 and lam > 1e-2
    mean_diag = float(torch.diagonal(G).mean())
    torch.testing.assert_close(S @ S.T, G + lam * mean_diag * torch.eye(10, dtype=torch.float64))


def test_energy_rank_picks_the_smallest_sufficient_rank():
    E, G, _ = _problem()
    lr = whitened_lowrank(E, G, 24, damp=1e-12, energy=0.5)
    e = lr.sigma ** 2
    r = lr.L_A.shape[1]
    assert float(e[:r].sum()) >= 0.5 * float(e.sum())
    assert r == 1 or float(e[: r - 1].sum()) < 0.5 * float(e.sum())
