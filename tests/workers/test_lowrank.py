import pytest
import torch
from alloc_spy import GramSizedAllocations

from aser.kernels.quant import fake_quantize_weight
from aser.workers.lowrank import (
    _energy_rank,
    damped_cholesky,
    l2qer_lowrank,
    mm_lower,
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


@pytest.mark.parametrize("N,K,block", [(24, 40, 16), (4, 33, 16), (7, 256, 256), (5, 300, 128), (3, 9, 256)])
def test_mm_lower_is_the_product_with_the_triangle(N, K, block):
    """Column blocks that do not divide K, a single block, a block wider than K: each equals the
    full product with the lower triangle."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(N, K, generator=g, dtype=torch.float64)
    full = torch.randn(K, K, generator=g, dtype=torch.float64)
    L = torch.tril(full)
    expected = A @ L
    got = mm_lower(A, L, block=block)
    assert got.shape == (N, K) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_mm_lower_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mm_lower"):
        mm_lower(torch.zeros(3, 4), torch.zeros(5, 5))


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
    assert not torch.equal(rd.L_A, ex.L_A)  # and it is really the randomized path that ran


def test_defaults_are_the_documented_ones() -> None:
    E, G, X = _problem(N=40, K=96, T=300, seed=6)
    kw = dict(svd="randomized", niter=4, oversample=16)
    for f, args in ((plain_lowrank, (E, 4)), (l2qer_lowrank, (E, X.abs().mean(1), 4)), (whitened_lowrank, (E, G, 4))):
        a, b = f(*args, svd="randomized"), f(*args, **kw)
        assert torch.equal(a.L_A, b.L_A) and torch.equal(a.L_B, b.L_B)
        c, d = f(*args), f(*args, svd="exact")
        assert torch.equal(c.L_A, d.L_A) and torch.equal(c.L_B, d.L_B)
        # and the arguments are passed on: the sketch differs from the exact SVD and by niter
        assert not torch.equal(a.L_A, c.L_A)
        assert not torch.equal(f(*args, svd="randomized", niter=1).L_A, f(*args, svd="randomized", niter=6).L_A)
    assert whitened_lowrank(E, G, 4).damp == 1e-2
    # the knobs reach the sketch: power iterations and rank 1 (the smallest the sketch serves)
    assert not torch.equal(plain_lowrank(E, 4, svd="randomized", niter=1).L_A, plain_lowrank(E, 4, svd="randomized", niter=6).L_A)
    assert not torch.equal(plain_lowrank(E, 1, svd="randomized").L_A, plain_lowrank(E, 1, svd="exact").L_A)


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


def test_cholesky_damping_grows_tenfold_per_try_and_gives_up_after_max_tries() -> None:
    G = torch.eye(4, dtype=torch.float64)
    G[0, 0] = -2.5  # mean diagonal 0.125: λ·0.125 must exceed 2.5, i.e. λ > 20
    S, lam, tries = damped_cholesky(G, 0.3)
    assert tries == 3 and lam == pytest.approx(30.0, rel=1e-12)  # 0.3 and 3 fail; 30 works
    torch.testing.assert_close(S @ S.T, G + 30.0 * 0.125 * torch.eye(4, dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError, match=r"after 2 tries \(last λ=3\)"):
        damped_cholesky(G, 0.3, max_tries=2)


def test_all_zero_gram_whitens_with_the_identity() -> None:
    S, lam, tries = damped_cholesky(torch.zeros(3, 3, dtype=torch.float64), 0.04)
    assert tries == 1 and lam == 0.04
    torch.testing.assert_close(S, 0.2 * torch.eye(3, dtype=torch.float64), rtol=1e-15, atol=0)


def test_reported_damping_tries_and_timings() -> None:
    E, G, _ = _problem()
    lr = whitened_lowrank(E, G, 4, damp=0.02, svd="exact")
    assert lr.damp == 0.02 and lr.cholesky_tries == 1
    plain, l2 = plain_lowrank(E, 4), l2qer_lowrank(E, torch.ones(40), 4)
    # Durations, not timestamps nor left out: a factorisation takes more than the clock's
    # resolution (ns) and far less than 30 s.
    for t in (lr.cholesky_s, lr.svd_s, plain.svd_s, l2.svd_s):
        assert 0.0 < t < 30.0
    for lr0 in (plain, l2):  # no whitening: nothing damped, nothing factorised
        assert lr0.damp == 0.0 and lr0.cholesky_tries == 0 and lr0.cholesky_s == 0.0
    torch.testing.assert_close(plain.sigma, torch.linalg.svdvals(E), rtol=1e-12, atol=0)


def test_auto_svd_is_randomized_only_for_ranks_far_below_the_size() -> None:
    E, G, _ = _problem(N=98, K=120, T=300, seed=5)
    # min(N, K) // 4 = 24 (98 / 4 = 24.5): rank 12 + oversample 8 = 20 < 24 goes randomized,
    # rank 16 + 8 = 24 (the boundary) does not.
    for rank, same_as in ((12, "randomized"), (16, "exact")):
        auto = plain_lowrank(E, rank, svd="auto", oversample=8)
        ref = plain_lowrank(E, rank, svd=same_as, oversample=8)
        assert torch.equal(auto.L_A, ref.L_A) and torch.equal(auto.L_B, ref.L_B)
    assert not torch.equal(plain_lowrank(E, 4, svd="exact").L_A, plain_lowrank(E, 4, svd="randomized").L_A)


def test_randomized_svd_restores_the_callers_random_stream() -> None:
    E, _, _ = _problem()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    plain_lowrank(E, 4, svd="randomized")
    assert torch.equal(torch.rand(3), expected)


def test_randomized_svd_caps_the_sketch_at_the_matrix_size() -> None:
    E, _, _ = _problem()  # 24 x 40: a sketch of 4 + 100 columns would not fit
    lr = plain_lowrank(E, 4, svd="randomized", oversample=100)
    ex = plain_lowrank(E, 4, svd="exact")
    # a full-width sketch spans everything: the exact answer up to rounding
    torch.testing.assert_close(lr.L_A @ lr.L_B, ex.L_A @ ex.L_B, rtol=0, atol=1e-10)


def test_energy_rank_edges() -> None:
    E, G, _ = _problem()
    assert whitened_lowrank(torch.zeros_like(E), G, 8, energy=0.9).L_A.shape == (24, 0)
    assert whitened_lowrank(E, G, 5, energy=1.0).L_A.shape == (24, 5)  # capped at the max rank
    full = whitened_lowrank(E, G, 24, damp=1e-12, energy=1.0)
    assert full.L_A.shape == (24, 24)
    # an energy target needs all singular values: it runs the exact SVD whatever svd says
    rnd = whitened_lowrank(E, G, 24, damp=1e-12, energy=0.5, svd="randomized")
    ex = whitened_lowrank(E, G, 24, damp=1e-12, energy=0.5, svd="exact")
    assert torch.equal(rnd.L_A, ex.L_A)
    top = whitened_lowrank(E, G, 24, damp=1e-12, energy=1e-9)
    assert top.L_A.shape == (24, 1) and top.sigma.shape == (24,)


def test_energy_rank_counts_a_share_reached_exactly_as_reached() -> None:
    sigma = torch.tensor([1.0, 3.0], dtype=torch.float64)  # shares of σ²: 0.1 and 0.9
    assert _energy_rank(sigma, 0.1, 8) == 1  # 0.1 in float32 is 0.10000000149 and would need 2
    assert _energy_rank(sigma, 0.1000001, 8) == 2 and _energy_rank(sigma, 0.1000001, 1) == 1
    assert _energy_rank(torch.zeros(3), 0.5, 8) == 0


def test_l2qer_weights_columns_by_normalised_mean_abs() -> None:
    E, _, X = _problem()
    mean_abs = X.abs().mean(1)
    lr = l2qer_lowrank(E, mean_abs, 3, svd="exact")
    s = mean_abs / torch.sqrt(mean_abs.min() * mean_abs.max())
    torch.testing.assert_close(lr.sigma, torch.linalg.svdvals(E * s), rtol=1e-12, atol=0)
    # best rank-3 approximation in the s-weighted norm: the residual is the sigma tail
    resid = float((((E - lr.L_A @ lr.L_B) * s) ** 2).sum())
    assert resid == pytest.approx(float((lr.sigma[3:] ** 2).sum()), rel=1e-9)
    # fp32 statistics are weighted in E's precision (fp64), not rounded to fp32 first
    lr32 = l2qer_lowrank(E, mean_abs.float(), 3, svd="exact")
    m32 = mean_abs.float().double()
    torch.testing.assert_close(lr32.sigma, torch.linalg.svdvals(E * m32 / torch.sqrt(m32.min() * m32.max())), rtol=1e-12, atol=0)
    # a channel that never fires is clamped, not divided by zero
    dead = mean_abs.clone()
    dead[0] = 0.0
    assert torch.isfinite(l2qer_lowrank(E, dead, 3, svd="exact").L_B).all()


def test_cholesky_holds_one_gram_sized_buffer_besides_g():
    """Issue 8: a 28672-wide down_proj Gram is 6.1 GiB in float64; on an H200 the earlier form
    (identity, lambda * I, G + lambda I, factor) held 24 GiB above G. Now: one buffer, factored in
    place, also when the first tries fail; the factor is the plain formula's (the same LAPACK
    call on the transpose: bit for bit; the lower form on the row-major matrix: to 1e-13)."""
    K = 48
    X = torch.randn(400, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = X.T @ X
    G0 = G.clone()
    with GramSizedAllocations(K * K * 8) as mode:
        S, lam, tries = damped_cholesky(G, 1e-2)
    assert mode.count == 1 and tries == 1
    eye = torch.eye(K, dtype=torch.float64)
    damped = G0 + lam * float(G0.diagonal().mean()) * eye
    assert torch.equal(S, torch.linalg.cholesky(damped.mT, upper=True).mT)
    torch.testing.assert_close(S, torch.linalg.cholesky(damped), rtol=1e-13, atol=1e-13)
    assert torch.equal(G, G0)  # the caller's Gram is untouched
    bad = -torch.eye(K, dtype=torch.float64)
    bad[0, 0] = 1.0  # indefinite: every try fails until lambda outweighs the -1s
    with GramSizedAllocations(K * K * 8) as mode:
        _, lam, tries = damped_cholesky(bad, 1e-2)
    assert tries > 1 and mode.count == 1


def test_the_factorization_makes_no_copy_inside_the_kernel():
    """torch's Cholesky of a row-major matrix factors a column-major copy of it inside the kernel,
    where a dispatch-level count cannot see it (the 70B-sized layer's reconstruction task held
    15.2 GiB where 10.6 were counted). Measured here as the growth of a fresh process's peak RSS
    while a 128 MiB Gram is factored with ``refill`` (in place): well under one Gram."""
    import subprocess
    import sys

    code = """
import resource, torch
from aser.workers.lowrank import damped_cholesky
K = 4096
G = torch.full((K, K), 0.5, dtype=torch.float64)  # built without temporaries: SPD, diagonally dominant
G.diagonal().fill_(float(K))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
damped_cholesky(G, 1e-2, refill=lambda buf: None)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (K * K * 8))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grams = float(out.stdout.strip().splitlines()[-1])
    assert grams < 0.25, grams
