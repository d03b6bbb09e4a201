"""ASER and its baselines as pure functions behind one typed config.

Two steps, so the pipeline can spread the second over a cluster:
- ``smooth_layer``: per group of linears sharing an input, choose the smoothing scale m and the
  outlier channels O (ASER step 1, or SmoothQuant), fold m into the layer's FP tensors and
  transform the statistics analytically (G̃ = G / (m mᵀ), ã = a / m);
- ``reconstruct_linear``: one linear: quantize (RTN or GPTQ, ASER step 2), then the method's
  low-rank correction (step 3), returned as codes, scales and (L_A, L_B).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from aser.kernels.quant import ACT_QUANT_STYLES, dequantize_weight, quantize_weight, weight_scale
from aser.workers.arch import LinearGroup, can_fold, fold_smoothing, groups_for
from aser.workers.gptq import gptq_quantize
from aser.workers.lowrank import (
    ROW_BLOCK,
    LowRank,
    l2qer_lowrank,
    output_error_sq,
    plain_lowrank,
    sum_sq,
    whitened_error_rows,
    whitened_error_sq,
    whitened_lowrank,
)
from aser.workers.stats import ChannelStats, GroupStats

METHODS = ("rtn", "smoothquant", "lorc", "l2qer", "er", "aser", "gptq", "gptq+er", "gptq+aser")
OUTLIER_MODES = ("lowrank", "side", "none")
SMOOTH_CHANNELS = ("outliers", "all")
SVD_MODES = ("exact", "randomized", "auto")
BASE_OUTLIERS = ("zero", "clipped", "full")


@dataclass(frozen=True)
class MethodConfig:
    """Everything that decides the numbers. Fields marked (reading) are ASER.md's readings."""

    method: str = "aser"
    rank: int = 32  # (reading) fixed rank of the low-rank path; max rank when rank_energy is set
    w_bits: int = 4
    a_bits: int | None = 8  # None: weight-only (W4A16)
    # Whose INT8 activation quantizer the model is computed with (kernels.quant.ACT_QUANT_STYLES):
    # compressed-tensors' (the w4a8-int format) or vLLM Marlin's (w4a16-pack files served with
    # VLLM_MARLIN_INPUT_DTYPE=int8). It decides the format `aser quantize` writes.
    act_quant: str = "compressed-tensors"
    group_size: int | None = None  # None: per output channel (the ASER setting)
    alpha: float = 0.5  # (reading) smoothing strength m = a^α / w^(1-α)
    num_outliers: int = 8  # (reading) f; the paper's 32 eats a rank-32 budget on narrow models
    outlier_mode: str = "side"  # (reading) lowrank: zeroed columns land in E; side: exact 16-bit columns
    reserve_rank: bool = False  # side columns count against `rank` (equal adapter size)
    # What the base holds in the outlier columns (the adapter's side columns hold the rest):
    # zero (the base needs its adapter), clipped (codes at the other columns' scale), or full
    # (the scale covers every column: the base alone is an RTN-class model).
    base_outliers: str = "zero"
    smooth_channels: str = "outliers"  # (reading) which channels get m != 1
    alpha_grid: tuple[float, ...] = ()  # per-group search of α by the whitened error left
    outlier_grid: tuple[int, ...] = ()  # per-group search of f by the whitened error left
    damp: float = 1e-2  # (reading) λ of the whitening Cholesky, escalated ×10 on failure
    svd: str = "auto"  # exact | randomized | auto (randomized when rank ≪ min(N, K))
    svd_niter: int = 4
    svd_oversample: int = 16
    rank_energy: float | None = None  # per-linear rank from the σ² energy kept
    gptq_damp: float = 1e-2
    gptq_block_size: int = 128

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"method.{name} {why}, got {getattr(self, name)!r}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        if self.rank < 0:
            raise bad("rank", "must be >= 0")
        if not 2 <= self.w_bits <= 8:
            raise bad("w_bits", "must be in [2, 8]")
        if self.a_bits is not None and not 2 <= self.a_bits <= 8:
            raise bad("a_bits", "must be in [2, 8] or None")
        if self.group_size is not None and self.group_size <= 0:
            raise bad("group_size", "must be > 0 or None")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "must be in [0, 1]")
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise bad("alpha_grid", "values must be in [0, 1]")
        if self.num_outliers < 0:
            raise bad("num_outliers", "must be >= 0")
        if any(f < 0 for f in self.outlier_grid):
            raise bad("outlier_grid", "values must be >= 0")
        if self.outlier_mode not in OUTLIER_MODES:
            raise bad("outlier_mode", f"must be one of {OUTLIER_MODES}")
        if self.act_quant not in ACT_QUANT_STYLES:
            raise bad("act_quant", f"must be one of {ACT_QUANT_STYLES}")
        if self.act_quant == "marlin" and self.a_bits != 8:
            raise bad("act_quant", "marlin quantizes activations to INT8 only (a_bits 8)")
        if self.base_outliers not in BASE_OUTLIERS:
            raise bad("base_outliers", f"must be one of {BASE_OUTLIERS}")
        if self.smooth_channels not in SMOOTH_CHANNELS:
            raise bad("smooth_channels", f"must be one of {SMOOTH_CHANNELS}")
        if not self.damp > 0:
            raise bad("damp", "must be > 0")
        if self.svd not in SVD_MODES:
            raise bad("svd", f"must be one of {SVD_MODES}")
        if self.rank_energy is not None and not 0.0 < self.rank_energy <= 1.0:
            raise bad("rank_energy", "must be in (0, 1]")

    # What each method is made of: one place, read by the functions below.
    @property
    def quantizer(self) -> str:
        return "gptq" if self.method.startswith("gptq") else "rtn"

    @property
    def lowrank(self) -> str | None:
        return {"lorc": "plain", "l2qer": "l2qer", "er": "whitened", "aser": "whitened",
                "gptq+er": "whitened", "gptq+aser": "whitened"}.get(self.method)

    @property
    def smoothing(self) -> str | None:
        return {"smoothquant": "smoothquant", "aser": "aser", "gptq+aser": "aser"}.get(self.method)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["alpha_grid"], d["outlier_grid"] = list(self.alpha_grid), list(self.outlier_grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown method field(s): {', '.join(sorted(unknown))}")
        kw = dict(d)
        for k in ("alpha_grid", "outlier_grid"):
            if k in kw:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        cfg.validate()
        return cfg


@dataclass
class LinearResult:
    """One quantized linear. q: (N, K) int8; scale: (N, K // g) in the weight's dtype;
    L_A: (N, r), L_B: (r, K) in the weight's dtype or None (rank 0)."""

    q: torch.Tensor
    scale: torch.Tensor
    L_A: torch.Tensor | None
    L_B: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)
    process: dict[str, Any] = field(default_factory=dict)  # where it was computed (pipeline tasks)

    @property
    def rank(self) -> int:
        return 0 if self.L_A is None else int(self.L_A.shape[1])

    def to(self, device: torch.device | str) -> LinearResult:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LinearResult(self.q.to(device), self.scale.to(device), mv(self.L_A), mv(self.L_B),
                            dict(self.metrics), dict(self.process))


@dataclass
class SmoothedLayer:
    tensors: dict[str, torch.Tensor]  # the layer's FP tensors with smoothing folded
    stats: dict[str, Any]  # per group, of the smoothed input (GroupStats or ChannelStats, as given)
    outliers: dict[str, torch.Tensor | None]  # per group: extracted input channels (sorted)
    choices: dict[str, dict[str, float]]  # per group: chosen α, f, and the search's errors
    scales: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per group: m, None if unsmoothed


# ---------------------------------------------------------------- step 1: smoothing


def smoothing_scale(
    weights: list[torch.Tensor], stats: GroupStats | ChannelStats, alpha: float, num_outliers: int, channels: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """m (K,) float64 and the outlier channels O (sorted LongTensor, or None if f = 0).

    score_j = a_j · max_i |W_ij| over the group; m_j = a_j^α / w_j^(1-α) on O (or on all
    channels), 1 elsewhere.
    """
    tiny = 1e-5
    a = stats.absmax.to(torch.float64).clamp_min(tiny)
    w = torch.stack([W.detach().abs().amax(dim=0).to(torch.float64) for W in weights]).amax(dim=0).clamp_min(tiny)
    m_all = a.pow(alpha) / w.pow(1.0 - alpha)
    O = None
    if num_outliers > 0:
        f = min(num_outliers, a.numel())
        O = torch.sort(torch.topk(a * w, f).indices).values
    if channels == "all":
        return m_all, O
    m = torch.ones_like(a)
    if O is not None:
        m[O] = m_all[O]
    return m, O


def _candidates(cfg: MethodConfig) -> list[tuple[float, int]]:
    alphas = cfg.alpha_grid or (cfg.alpha,)
    fs = cfg.outlier_grid or (cfg.num_outliers,)
    if cfg.smoothing == "smoothquant":
        fs = (0,)
    return [(a, f) for a in alphas for f in fs]


def needs_gram(cfg: MethodConfig) -> bool:
    """Whether ``smooth_layer`` needs the Grams (a search scores each candidate by the error
    after steps 2–3); otherwise the channel statistics are all it reads."""
    return cfg.smoothing is not None and len(_candidates(cfg)) > 1


def smooth_layer(
    tensors: Mapping[str, torch.Tensor],
    stats: Mapping[str, GroupStats] | Mapping[str, ChannelStats],
    cfg: MethodConfig,
    config: Any,
) -> SmoothedLayer:
    """ASER step 1 (or SmoothQuant) for one decoder layer; a no-op for methods without smoothing.

    tensors: the layer's FP tensors by relative name; stats: per group name, GroupStats, or
    ChannelStats when ``needs_gram(cfg)`` is false; config: HF config. The result's ``stats`` are
    those given, scaled to the smoothed input; ``scales`` holds each group's m, for whoever
    scales the Gram later (``stats.reduce_grams_into``).
    With a search grid, each candidate (α, f) is scored by the whitened output error the whole
    group keeps after steps 2–3 (Σ_i ‖(W_i − Ŵ_i − L_A L_B) X‖²), computed in float64.
    """
    out = dict(tensors)
    new_stats: dict[str, Any] = dict(stats)
    outliers: dict[str, torch.Tensor | None] = {}
    choices: dict[str, dict[str, float]] = {}
    scales: dict[str, torch.Tensor | None] = {}
    if needs_gram(cfg) and not all(isinstance(st, GroupStats) for st in stats.values()):
        raise ValueError("the smoothing search scores candidates by the reconstruction error: it needs the Grams")
    for g in groups_for(config):
        outliers[g.name] = None
        scales[g.name] = None
        if cfg.smoothing is None:
            continue
        weights = [out[f"{lin}.weight"] for lin in g.linears]
        foldable = can_fold(g, config)
        cands = _candidates(cfg)
        best: tuple[float, torch.Tensor | None, torch.Tensor | None, float, int] | None = None
        for alpha, f in cands:
            channels = "all" if cfg.smoothing == "smoothquant" else cfg.smooth_channels
            m: torch.Tensor | None
            O: torch.Tensor | None
            m, O = smoothing_scale(weights, stats[g.name], alpha, f, channels)
            if cfg.smoothing == "smoothquant" or cfg.outlier_mode == "none":
                O = None
            if not foldable:
                m = None
            if len(cands) == 1:
                best = (0.0, m, O, alpha, f)
                break
            st = stats[g.name]
            assert isinstance(st, GroupStats)  # needs_gram: checked above
            err = _group_error(g, weights, st, m, O, cfg)
            if best is None or err < best[0]:
                best = (err, m, O, alpha, f)
        assert best is not None
        err, m, O, alpha, f = best
        choices[g.name] = {"alpha": alpha, "num_outliers": float(0 if O is None else O.numel()),
                           "smoothed": float(m is not None), "search_error": err}
        if m is not None:
            out = fold_smoothing(out, g, m)
            new_stats[g.name] = stats[g.name].scaled(m)
        outliers[g.name] = O
        scales[g.name] = m
    return SmoothedLayer(out, new_stats, outliers, choices, scales)


def _group_error(
    g: LinearGroup, weights: list[torch.Tensor], stats: GroupStats,
    m: torch.Tensor | None, O: torch.Tensor | None, cfg: MethodConfig,
) -> float:
    st = stats if m is None else stats.scaled(m)
    total = 0.0
    for W in weights:
        W64 = W.to(torch.float64) * (1.0 if m is None else m[None, :])
        res = reconstruct_linear(W64, st, O, cfg, scale_dtype=W.dtype)
        total += res.metrics["err_after_sq"]
    return total


# ---------------------------------------------------------------- steps 2 and 3


def _quantize(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor | None, cfg: MethodConfig,
              scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) int8 and scales of W (N, K) float64.

    Columns not in `keep` (the outliers) are zeroed for GPTQ/RTN (the adapter carries their
    residual exactly, so no error of theirs is compensated in the others); their codes are then
    ``cfg.base_outliers``: 0, or W's columns rounded at the row's scale (clipped to the INT
    range), a scale over the kept columns only (clipped) or over every column (full).
    """
    def stored(s: torch.Tensor) -> torch.Tensor:  # rounded through the stored dtype
        return s.to(scale_dtype).to(W.dtype)

    given = None
    if keep is not None and cfg.base_outliers == "full":
        given = stored(weight_scale(W, cfg.w_bits, cfg.group_size))
    if cfg.quantizer == "rtn":
        # Row blocks: every step is per row (per-channel or per-group scales), so the bytes are
        # those of the whole matrix at once, with a block's temporaries instead of (N, K) ones.
        N = W.shape[0]
        q = torch.empty(W.shape, dtype=torch.int8, device=W.device)
        scales = []
        for r0 in range(0, N, ROW_BLOCK):
            r1 = min(r0 + ROW_BLOCK, N)
            Wb = W[r0:r1] if keep is None else torch.where(keep[None, :], W[r0:r1], torch.zeros((), dtype=W.dtype))
            sb = given[r0:r1] if given is not None else stored(weight_scale(Wb, cfg.w_bits, cfg.group_size))
            q[r0:r1], sb = quantize_weight(Wb, cfg.w_bits, cfg.group_size, scale=sb)
            scales.append(sb)
        scale = torch.cat(scales)
    elif keep is None or cfg.group_size is not None:
        Wm = W if keep is None else torch.where(keep[None, :], W, torch.zeros((), dtype=W.dtype))
        q, scale = gptq_quantize(Wm, G, cfg.w_bits, group_size=cfg.group_size, damp=cfg.gptq_damp,
                                 block_size=cfg.gptq_block_size, scale_dtype=scale_dtype, scale=given)
    else:
        idx = keep.nonzero().squeeze(1)
        q_keep, scale = gptq_quantize(W[:, idx], G[idx][:, idx], cfg.w_bits, damp=cfg.gptq_damp,
                                      block_size=cfg.gptq_block_size, scale_dtype=scale_dtype,
                                      scale=given)
        q = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
        q[:, idx] = q_keep
    if keep is not None and cfg.base_outliers != "zero":
        out = ~keep
        q[:, out] = quantize_weight(W, cfg.w_bits, cfg.group_size, scale=scale)[0][:, out]
    return q, scale


def _lowrank(E: torch.Tensor, G: torch.Tensor, stats: GroupStats, rank: int, cfg: MethodConfig,
             refill: Callable[[torch.Tensor], object] | None) -> LowRank | None:
    if cfg.lowrank is None or rank == 0:
        return None
    kw = dict(svd=cfg.svd, niter=cfg.svd_niter, oversample=cfg.svd_oversample)
    if cfg.lowrank == "plain":
        return plain_lowrank(E, rank, **kw)  # type: ignore[arg-type]
    if cfg.lowrank == "l2qer":
        return l2qer_lowrank(E, stats.mean_abs, rank, **kw)  # type: ignore[arg-type]
    return whitened_lowrank(E, G, rank, damp=cfg.damp, energy=cfg.rank_energy, refill=refill, **kw)  # type: ignore[arg-type]


def reconstruct_linear(
    W: torch.Tensor,
    stats: GroupStats,
    outliers: torch.Tensor | None,
    cfg: MethodConfig,
    *,
    scale_dtype: torch.dtype | None = None,
    refill_gram: Callable[[torch.Tensor], object] | None = None,
) -> LinearResult:
    """Steps 2–3 for one (already smoothed) linear.

    W: (N, K) float (W̃ = W·diag(m)); stats: of the smoothed input x̃; outliers: channels O
    extracted from the INT path (None: none). Outputs are in ``scale_dtype`` (default W's dtype);
    metrics hold the relative output errors ‖ΔW X‖ / ‖W X‖ before and after the correction and
    seconds per stage.

    refill_gram: the caller gives ``stats.gram`` up: the whitening factors it in place (it is
    lost), and ``refill_gram(buf)`` writes the Gram into ``buf`` again should a Cholesky attempt
    fail (``lowrank.damped_cholesky``). None: ``stats`` is left as it was.

    Memory (RTN + whitened low rank, the ASER default): the Gram (and, without ``refill_gram``,
    its factor beside it), two (N, K) float64 buffers (W̃ turned into E in place; E S, later
    R S in place) and blocks of rows (``lowrank.ROW_BLOCK``) for the rest: a Llama-3-70B
    down_proj needs 6.1 + 2 x 1.75 GiB (the first form held the Gram, its factor and five or six
    such buffers: 22 GiB).
    """
    out_dtype = scale_dtype or W.dtype
    N = W.shape[0]
    E = W.detach().to(torch.float64, copy=True)  # W̃ now; E = W̃ − Ŵ in place after quantizing
    G = stats.gram.to(E.device)
    t0 = time.perf_counter()
    keep = None
    if outliers is not None and outliers.numel() and cfg.outlier_mode != "none":
        keep = torch.ones(E.shape[1], dtype=torch.bool, device=E.device)
        keep[outliers.to(E.device)] = False
    q, scale = _quantize(E, G, keep, cfg, out_dtype)
    t1 = time.perf_counter()
    for r0 in range(0, N, ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, N)
        E[r0:r1].sub_(dequantize_weight(q[r0:r1], scale[r0:r1], cfg.group_size))
    side = cfg.outlier_mode == "side" and keep is not None
    side_E: torch.Tensor | None = None
    if side:
        assert outliers is not None
        side_E = E[:, outliers]  # W̃'s columns less what the base holds there (a copy)
        E[:, outliers] = 0.0  # the side columns carry W̃[:, O] exactly: the low rank fits the rest
    f = 0 if not side else int(outliers.numel())  # type: ignore[union-attr]
    rank = max(cfg.rank - f, 0) if (side and cfg.reserve_rank) else cfg.rank
    lr = _lowrank(E, G, stats, rank, cfg, refill_gram)
    if side_E is not None:
        E[:, outliers] = side_E  # E whole again
    t2 = time.perf_counter()
    L_A: torch.Tensor | None = None
    L_B: torch.Tensor | None = None
    if lr is not None and lr.L_A.shape[1] > 0:
        L_A, L_B = lr.L_A, lr.L_B
    if side_E is not None:
        assert outliers is not None
        sel = torch.zeros(f, E.shape[1], dtype=torch.float64, device=E.device)
        sel[torch.arange(f, device=E.device), outliers.to(E.device)] = 1.0
        L_A = side_E if L_A is None else torch.cat([L_A, side_E], dim=1)
        L_B = sel if L_B is None else torch.cat([L_B, sel], dim=0)
    if L_A is not None:
        assert L_B is not None
        L_A, L_B = L_A.to(out_dtype), L_B.to(out_dtype)
    # Errors are measured with what is stored (scales and factors in out_dtype).
    A64 = None if L_A is None else L_A.to(torch.float64)
    B64 = None if L_B is None else L_B.to(torch.float64)
    t_m = time.perf_counter()
    if lr is not None and lr.factor is not None and lr.projected is not None:
        # Through the whitening factor: ‖D X‖² = ‖D S‖² − shift‖D‖². E S is the SVD's input
        # (plus the side columns' rows of S); R S = E S − L_A (L_B S) costs (r + f) K² + N K (r + f),
        # in place in E S (the low-rank fit is done with it); ‖R‖² and the reference W S come by
        # blocks of rows (only W S is a new N K² product: a 70B down_proj's is 13.5 TFLOP).
        S, shift = lr.factor, lr.shift
        ES = lr.projected
        lr.projected = None
        if side_E is not None:
            assert outliers is not None
            ES.addmm_(side_E, S[outliers, :])
        before = whitened_error_sq(ES, E, shift)
        if A64 is None:
            after = before
        else:
            assert B64 is not None
            RS = ES.addmm_(A64, B64 @ S, alpha=-1.0)
            r_sq = sum(sum_sq(torch.addmm(E[r0:r0 + ROW_BLOCK], A64[r0:r0 + ROW_BLOCK], B64, alpha=-1.0))
                       for r0 in range(0, N, ROW_BLOCK))
            after = max(sum_sq(RS) - shift * r_sq, 0.0)
        del ES
        ref = whitened_error_rows(lambda r0, r1: W.detach()[r0:r1], N, S, shift)
    else:
        R = E if A64 is None else E - A64 @ B64  # type: ignore[operator]
        ref = output_error_sq(W.detach().to(torch.float64), G)
        before = output_error_sq(E, G)
        after = output_error_sq(R, G)
    metrics = {
        "err_before": (before / ref) ** 0.5 if ref > 0 else 0.0,
        "err_after": (after / ref) ** 0.5 if ref > 0 else 0.0,
        "err_after_sq": after,
        "rank": float(0 if L_A is None else L_A.shape[1]),
        "num_side_columns": float(f),
        "damp": lr.damp if lr is not None else 0.0,
        "cholesky_tries": float(lr.cholesky_tries) if lr is not None else 0.0,
        "quantize_s": t1 - t0,
        "cholesky_s": lr.cholesky_s if lr is not None else 0.0,
        "svd_s": lr.svd_s if lr is not None else 0.0,
        "lowrank_s": t2 - t1,
        "metrics_s": time.perf_counter() - t_m,
    }
    return LinearResult(q=q, scale=scale.to(out_dtype), L_A=L_A, L_B=L_B, metrics=metrics)


def quantize_layer(
    tensors: Mapping[str, torch.Tensor], stats: Mapping[str, GroupStats], cfg: MethodConfig, config: Any,
    reconstruct: Callable[..., LinearResult] = reconstruct_linear,
) -> tuple[SmoothedLayer, dict[str, LinearResult]]:
    """Steps 1–3 for one layer, sequentially (the pipeline spreads step 2–3 over workers)."""
    sm = smooth_layer(tensors, stats, cfg, config)
    results: dict[str, LinearResult] = {}
    for g in groups_for(config):
        for lin in g.linears:
            W = sm.tensors[f"{lin}.weight"]
            results[lin] = reconstruct(W, sm.stats[g.name], sm.outliers[g.name], cfg, scale_dtype=W.dtype)
    return sm, results
