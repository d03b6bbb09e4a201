"""Low-rank error reconstruction: whitening SVD (ER/ASER step 3), plain SVD (LoRC), L2QER.

All three return (L_A: (N, r), L_B: (r, K)) with E ≈ L_A L_B in the sense each minimises:
- whitened: ‖(E − L_A L_B) X‖_F over rank-r, via S = chol(G + λ·mean(diag G)·I), SVD of E S;
- plain:    ‖E − L_A L_B‖_F;
- l2qer:    ‖(E − L_A L_B) diag(s)‖_F with s_j = mean|x_j| / sqrt(min(s)·max(s)).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    L_A: torch.Tensor  # (N, r)
    L_B: torch.Tensor  # (r, K)
    sigma: torch.Tensor  # singular values of the (weighted) error that were computed, descending
    damp: float  # λ used (whitened only; 0 otherwise)
    cholesky_tries: int
    cholesky_s: float = 0.0
    svd_s: float = 0.0
    # Whitened only: the factor S (S Sᵀ = G + shift·I), the shift, and E S (the SVD's input),
    # kept so that output errors come as ‖D X‖² = ‖D S‖² − shift·‖D‖² without D G products.
    factor: torch.Tensor | None = None
    shift: float = 0.0
    projected: torch.Tensor | None = None


def damped_cholesky(
    G: torch.Tensor, damp: float, max_tries: int = 6, *, refill: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of G + λ·mean(diag G)·I, λ escalated ×10 on failure.

    G: (K, K) float64. Returns (S, λ used, attempts). Raises after max_tries failures.

    Memory: without ``refill``, G is left unchanged and the damped copy is factored in place
    (``out=`` the input; the damping touches only its diagonal): one Gram-sized buffer besides
    G. With ``refill``, G itself is damped and factored in place and becomes S: no Gram-sized
    buffer at all; a failed attempt has overwritten G (torch zeroes the other triangle even on
    failure), so ``refill(G)`` must write the Gram into it again before the next one (a
    reconstruction task fetches it from the object store again). A Llama-3-70B down_proj Gram is
    6.1 GiB in float64; the first form (an identity, λ·I, G + λI, then the factor) held four
    such buffers: 24 GiB above G on an H200, measured; until the factorization ran on S's
    column-major transpose, torch's kernel also made a column-major copy (the 70B-sized layer's
    reconstruction task: 15.2 GiB private where 10.6 were counted).
    """
    mean_diag = _mean_diag(G)
    S = G if refill is not None else torch.empty_like(G)
    info = torch.empty((), dtype=torch.int32, device=G.device)
    lam = damp
    for attempt in range(1, max_tries + 1):
        if refill is None:
            S.copy_(G)
        elif attempt > 1:
            refill(S)
        S.diagonal().add_(lam * mean_diag)
        # LAPACK factors column-major matrices: given the row-major S, torch factors a
        # column-major copy (a Gram-sized buffer inside the kernel, invisible to a dispatch-level
        # count: measured 0.5 GiB more RssAnon at K = 8192). S's transpose is column-major and,
        # S being symmetric where it is read, the same matrix: its upper factor Uᵀ = L is
        # computed where it lies (0.007 GiB more). Both read S's lower triangle.
        X = S.mT
        torch.linalg.cholesky_ex(X, upper=True, out=(X, info))
        if int(info) == 0:
            return S, lam, attempt
        lam *= 10.0
    raise torch.linalg.LinAlgError(f"Cholesky failed after {max_tries} tries (last λ={lam / 10:g})")


def _mean_diag(G: torch.Tensor) -> float:
    """The damping's unit: mean(diag G), or 1 for all-zero inputs (whitening degenerates to the
    identity)."""
    mean_diag = float(torch.diagonal(G).mean())
    return mean_diag if mean_diag > 0 else 1.0


# Columns per block of ``mm_lower``: 512 was the fastest of 256-2048 at K = 1536 and 7168.
TRI_BLOCK = 512


def mm_lower(A: torch.Tensor, L: torch.Tensor, block: int = TRI_BLOCK) -> torch.Tensor:
    """A @ L for a lower-triangular L: (N, K) @ (K, K) -> (N, K), one block of columns at a time,
    each from the rows of L at or below the block (the rows above are zeros): about N K (K + block)
    / 2 multiply-adds instead of N K², what a BLAS ``trmm`` does and torch does not expose. The
    products with the whitening factor (E S, W S) are a reconstruction's two N K² products (a
    Llama-3-70B down_proj's: 13.5 TFLOP each as full products); ``benchmarks/tri_product.py``:
    0.66-0.76 of a full product's time in float64 on one CPU thread. The blocks are fixed, so
    the same inputs give the same bytes."""
    K = L.shape[0]
    if L.shape != (K, K) or A.shape[-1] != K:
        raise ValueError(f"mm_lower: shapes {tuple(A.shape)} @ {tuple(L.shape)}")
    out = torch.empty(A.shape[0], K, dtype=torch.result_type(A, L), device=A.device)
    for c0 in range(0, K, block):
        c1 = min(c0 + block, K)
        out[:, c0:c1] = A[:, c0:] @ L[c0:, c0:c1]
    return out


def sum_sq(D: torch.Tensor) -> float:
    """‖D‖_F² as one dot product of D with itself: no temporary of D's size (``(D * D).sum()``
    makes one: 1.75 GiB for a Llama-3-70B down_proj in float64)."""
    flat = D.reshape(-1)
    return float(torch.dot(flat, flat))


def whitened_error_sq(DS: torch.Tensor, D: torch.Tensor, shift: float) -> float:
    """‖D X‖_F² from D S and D, where S Sᵀ = G + shift·I = X Xᵀ + shift·I: tr(D G Dᵀ) =
    ‖D S‖² − shift·‖D‖², exact up to rounding (clamped at 0 against it). Costs two reductions
    instead of the 2 N K² of ``output_error_sq``."""
    return max(sum_sq(DS) - shift * sum_sq(D), 0.0)


# Rows per block of ``whitened_error_rows``: 1024 rows of a 28672-wide input are 224 MiB in float64.
ROW_BLOCK = 1024


def whitened_error_rows(D: Callable[[int, int], torch.Tensor], N: int, S: torch.Tensor, shift: float,
                        rows: int = ROW_BLOCK) -> float:
    """``whitened_error_sq`` of an (N, K) matrix given by its blocks of rows (``D(r0, r1)``, in
    any dtype; cast to S's), never materialised whole: the reference ‖W X‖² and the error left
    ‖(E − L_A L_B) X‖² cost a block of rows and its product with S, not two (N, K) float64
    buffers."""
    total_ds = total_d = 0.0
    for r0 in range(0, N, rows):
        block = D(r0, min(r0 + rows, N)).to(S.dtype)
        total_d += sum_sq(block)
        total_ds += sum_sq(mm_lower(block, S))
    return max(total_ds - shift * total_d, 0.0)


def _top_svd(A: torch.Tensor, rank: int, mode: str, niter: int, oversample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` (U, S, V) of A (N, K); V is (K, r) (not transposed)."""
    small = min(A.shape)
    use_random = mode == "randomized" or (mode == "auto" and rank + oversample < small // 4)
    if use_random and rank > 0:
        q = min(rank + oversample, small)
        # Fixed seed: same inputs, same bytes (DESIGN invariant 6).
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            U, S, V = torch.svd_lowrank(A, q=q, niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        return U[:, :rank], S, V[:, :rank]
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank], S, Vh[:rank].T


def _energy_rank(sigma: torch.Tensor, energy: float, max_rank: int) -> int:
    """Smallest r whose kept σ² reaches `energy` of the total, capped at max_rank."""
    e = sigma.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
    return min(r, max_rank, sigma.numel())


def whitened_lowrank(
    E: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    *,
    damp: float = 1e-2,
    svd: str = "exact",
    niter: int = 4,
    oversample: int = 16,
    energy: float | None = None,
    refill: Callable[[torch.Tensor], object] | None = None,
) -> LowRank:
    """ER / ASER step 3. E: (N, K) float64; G: (K, K) float64 (Gram of the layer's input).

    refill: factor G in place (it becomes ``factor``), see ``damped_cholesky``."""
    t0 = time.perf_counter()
    mean_diag = _mean_diag(G)
    S, lam, tries = damped_cholesky(G, damp, refill=refill)
    t1 = time.perf_counter()
    ES = mm_lower(E, S)
    U, sig, V = _top_svd(ES, min(rank, min(E.shape)), "exact" if energy is not None else svd, niter, oversample)
    r = U.shape[1] if energy is None else _energy_rank(sig, energy, rank)
    U, V = U[:, :r], V[:, :r]
    L_A = U * sig[:r]
    # L_B = V_rᵀ S⁻¹  ⇔  L_Bᵀ = S⁻ᵀ V_r: a triangular solve with Sᵀ (upper), never an inverse.
    L_B = torch.linalg.solve_triangular(S.T, V, upper=True).T
    return LowRank(L_A, L_B, sig, lam, tries, cholesky_s=t1 - t0, svd_s=time.perf_counter() - t1,
                   factor=S, shift=lam * mean_diag, projected=ES)


def plain_lowrank(E: torch.Tensor, rank: int, *, svd: str = "exact", niter: int = 4, oversample: int = 16) -> LowRank:
    """LoRC: best rank-r approximation of E in Frobenius norm."""
    t0 = time.perf_counter()
    U, sig, V = _top_svd(E, min(rank, min(E.shape)), svd, niter, oversample)
    r = U.shape[1]
    return LowRank(U * sig[:r], V.T.contiguous(), sig, 0.0, 0, svd_s=time.perf_counter() - t0)


def l2qer_lowrank(
    E: torch.Tensor, mean_abs: torch.Tensor, rank: int, *, svd: str = "exact", niter: int = 4, oversample: int = 16
) -> LowRank:
    """L²QER: SVD of E·diag(s), s_j = mean|x_j| normalised by sqrt(min(s)·max(s))."""
    s = mean_abs.to(E.dtype).clamp_min(torch.finfo(E.dtype).tiny)
    s = s / torch.sqrt(s.min() * s.max())
    t0 = time.perf_counter()
    U, sig, V = _top_svd(E * s[None, :], min(rank, min(E.shape)), svd, niter, oversample)
    r = U.shape[1]
    return LowRank(U * sig[:r], (V.T / s[None, :]).contiguous(), sig, 0.0, 0, svd_s=time.perf_counter() - t0)


def output_error_sq(D: torch.Tensor, G: torch.Tensor) -> float:
    """‖D X‖_F² = tr(D G Dᵀ) for D: (N, K), G = X Xᵀ: (K, K)."""
    return float(((D @ G) * D).sum())
