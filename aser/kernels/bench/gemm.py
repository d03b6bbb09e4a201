"""GEMM throughput: W4A8 + low-rank (ours), W4A16 + low-rank (ours), torch bf16, torch._int_mm.

    python -m aser.kernels.bench.gemm                  # full sweep on a CUDA machine
    python -m aser.kernels.bench.gemm --quick          # M in {16, 2048}, Llama-3-8B shapes
    python -m aser.kernels.bench.gemm --smoke          # tiny shapes through the references (CPU)

Prints a markdown table and writes JSON (``--out``). TOPS count the base GEMM only (2 M N K),
so every column is comparable; the low-rank path's extra work shows up as lower TOPS and in
``lr_overhead`` (time at rank r / time at rank 0 - 1). ``w4a8`` is the GEMM on pre-quantized
activations; ``w4a8_e2e`` adds the per-token quantization kernel (what a layer pays).
Each of our kernels is timed over a few tile shapes and both low-rank modes; the best is
reported with its choice, so the table also answers "separate or fused t = x L_B^T".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from aser.kernels.act_quant import quantize_activation_int8
from aser.kernels.backend import Backend
from aser.kernels.gemm import GemmBlocks, w4a8_gemm, w4a16_gemm
from aser.kernels.quant import pack_int4

H200_INT8_DENSE_TOPS = 1979.0
M_SWEEP = (1, 16, 128, 2048, 8192)
KN_8B = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
KN_70B = ((8192, 8192), (8192, 28672), (28672, 8192))
RANKS = (0, 32, 128)
MODES = ("separate", "fused")


def candidate_blocks(M: int) -> list[GemmBlocks]:
    """A handful of tiles per M regime (small M: narrow tiles, more K per step)."""
    if M <= 16:
        return [GemmBlocks(16, 64, 128, num_warps=4, num_stages=4),
                GemmBlocks(16, 128, 128, num_warps=4, num_stages=4),
                GemmBlocks(16, 64, 256, num_warps=4, num_stages=3)]
    if M <= 128:
        return [GemmBlocks(64, 128, 128, num_warps=4, num_stages=4),
                GemmBlocks(32, 128, 128, num_warps=4, num_stages=4),
                GemmBlocks(128, 128, 64, num_warps=8, num_stages=3)]
    return [GemmBlocks(128, 128, 128, num_warps=8, num_stages=3),
            GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
            GemmBlocks(64, 128, 128, num_warps=4, num_stages=4)]


def _time_cuda(fn: Callable[[], object]) -> float:
    """Median seconds per call (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3


def _time_cpu(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _best(fns: dict[str, Callable[[], object]], timer: Callable[[Callable[[], object]], float]) -> tuple[float, str]:
    results = {}
    for label, fn in fns.items():
        try:
            results[label] = timer(fn)
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
            print(f"  skipped {label}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    if not results:
        return float("nan"), "none"
    label = min(results, key=lambda k: results[k])
    return results[label], label


def bench_shape(M: int, K: int, N: int, r: int, device: str, smoke: bool) -> dict[str, object]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend: Backend = "triton" if device == "cuda" else "torch"
    timer = _time_cuda if device == "cuda" else _time_cpu
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    q_w = torch.randint(-8, 8, (N, K), device=device, dtype=torch.int8, generator=g)
    packed = pack_int4(q_w)
    w_scale = torch.rand(N, 1, device=device, dtype=dtype, generator=g) * 0.01
    L_A = torch.randn(N, r, device=device, dtype=dtype, generator=g) * 0.01 if r else None
    L_B = torch.randn(r, K, device=device, dtype=dtype, generator=g) * 0.01 if r else None
    qa = quantize_activation_int8(x, backend=backend)
    blocks = [None] if smoke else candidate_blocks(M)
    modes = MODES if r else ("separate",)

    def a8(b: GemmBlocks | None, mode: str, e2e: bool) -> Callable[[], object]:
        def run() -> object:
            q = quantize_activation_int8(x, backend=backend) if e2e else qa
            return w4a8_gemm(q.q, q.scale, packed, w_scale, K, x, L_A, L_B, lowrank_mode=mode,  # type: ignore[arg-type]
                             blocks=b, backend=backend)
        return run

    def a16(b: GemmBlocks | None, mode: str) -> Callable[[], object]:
        return lambda: w4a16_gemm(x, packed, w_scale, K, L_A, L_B, lowrank_mode=mode,  # type: ignore[arg-type]
                                  blocks=b, backend=backend)

    def label(b: GemmBlocks | None, mode: str) -> str:
        return f"{mode}:{'default' if b is None else f'{b.block_m}x{b.block_n}x{b.block_k}/w{b.num_warps}s{b.num_stages}'}"

    row: dict[str, object] = {"M": M, "K": K, "N": N, "r": r}
    t, choice = _best({label(b, m): a8(b, m, False) for b in blocks for m in modes}, timer)
    row["w4a8_s"], row["w4a8_choice"] = t, choice
    best_mode, _, best_tile = choice.partition(":")
    best_b = next((b for b in blocks if label(b, best_mode).endswith(best_tile)), None)
    row["w4a8_e2e_s"] = timer(a8(best_b, best_mode, True))
    t, choice = _best({label(b, m): a16(b, m) for b in blocks for m in modes}, timer)
    row["w4a16_s"], row["w4a16_choice"] = t, choice
    if r == 0:
        w_bf16 = torch.randn(N, K, device=device, dtype=dtype, generator=g)
        row["bf16_s"] = timer(lambda: x @ w_bf16.T)
        row["int_mm_s"] = float("nan")
        if device == "cuda" and M > 16 and K % 8 == 0 and N % 8 == 0:
            w8 = torch.randint(-128, 127, (K, N), device=device, dtype=torch.int8, generator=g)
            row["int_mm_s"] = timer(lambda: torch._int_mm(qa.q, w8))
    return row


def summarize(rows: list[dict[str, object]], peak_tops: float) -> list[dict[str, object]]:
    """Add TOPS, ratios to bf16 and the low-rank overhead vs the same shape at r = 0."""
    base = {(r["M"], r["K"], r["N"]): r for r in rows if r["r"] == 0}
    for r in rows:
        b = base.get((r["M"], r["K"], r["N"]))
        ops = 2.0 * float(r["M"]) * float(r["K"]) * float(r["N"])  # type: ignore[arg-type]
        for k in ("w4a8", "w4a8_e2e", "w4a16"):
            r[f"{k}_tops"] = ops / float(r[f"{k}_s"]) / 1e12  # type: ignore[arg-type]
        if b is not None:
            bf16 = float(b["bf16_s"])  # type: ignore[arg-type]
            r["bf16_tops"] = ops / bf16 / 1e12
            r["int_mm_tops"] = ops / float(b["int_mm_s"]) / 1e12  # type: ignore[arg-type]
            r["w4a8_vs_bf16"] = bf16 / float(r["w4a8_s"])  # type: ignore[arg-type]
            r["w4a16_vs_bf16"] = bf16 / float(r["w4a16_s"])  # type: ignore[arg-type]
            r["w4a8_lr_overhead"] = float(r["w4a8_s"]) / float(b["w4a8_s"]) - 1  # type: ignore[arg-type]
            r["w4a16_lr_overhead"] = float(r["w4a16_s"]) / float(b["w4a16_s"]) - 1  # type: ignore[arg-type]
        r["w4a8_peak_frac"] = float(r["w4a8_tops"]) / peak_tops  # type: ignore[arg-type]
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    cols = [("M", "M", "{}"), ("K", "K", "{}"), ("N", "N", "{}"), ("r", "r", "{}"),
            ("w4a8 TOPS", "w4a8_tops", "{:.1f}"), ("w4a8+quant TOPS", "w4a8_e2e_tops", "{:.1f}"),
            ("w4a16 TOPS", "w4a16_tops", "{:.1f}"), ("bf16 TOPS", "bf16_tops", "{:.1f}"),
            ("int_mm TOPS", "int_mm_tops", "{:.1f}"), ("w4a8/bf16", "w4a8_vs_bf16", "{:.2f}x"),
            ("w4a16/bf16", "w4a16_vs_bf16", "{:.2f}x"), ("w4a8 lr ovh", "w4a8_lr_overhead", "{:+.1%}"),
            ("w4a16 lr ovh", "w4a16_lr_overhead", "{:+.1%}"), ("w4a8 % peak", "w4a8_peak_frac", "{:.1%}"),
            ("w4a8 choice", "w4a8_choice", "{}")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None or (isinstance(v, float) and v != v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the torch references (runs on CPU)")
    p.add_argument("--quick", action="store_true", help="M in {16, 2048} and Llama-3-8B shapes only")
    p.add_argument("--models", default="8b,70b", help="comma list of 8b,70b")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--m", default=",".join(map(str, M_SWEEP)), help="comma list of M")
    p.add_argument("--peak-tops", type=float, default=H200_INT8_DENSE_TOPS,
                   help="dense INT8 tensor-core peak of the GPU (H200: 1979)")
    p.add_argument("--out", default="bench_gemm.json")
    args = p.parse_args(argv)

    if args.smoke:
        device, ms, kns, ranks = "cpu", [1, 7], [(64, 48), (100, 40)], [0, 4]
    else:
        if not torch.cuda.is_available():
            print("bench.gemm needs a CUDA GPU with Triton (none found). Use --smoke to check the "
                  "script on CPU through the torch references.", file=sys.stderr)
            return 2
        device = "cuda"
        ms = [16, 2048] if args.quick else [int(v) for v in args.m.split(",")]
        wanted = {"8b"} if args.quick else set(args.models.split(","))
        kns = [*(KN_8B if "8b" in wanted else ()), *(KN_70B if "70b" in wanted else ())]
        ranks = [int(v) for v in args.ranks.split(",")]
        if 0 not in ranks:
            ranks = [0, *ranks]  # the baselines and overheads are measured at r = 0

    rows = []
    for K, N in kns:
        for M in ms:
            for r in ranks:
                t0 = time.perf_counter()
                rows.append(bench_shape(M, K, N, r, device, args.smoke))
                print(f"M={M} K={K} N={N} r={r}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                if device == "cuda":
                    torch.cuda.empty_cache()
    rows = summarize(rows, args.peak_tops)
    print(markdown(rows))
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke, torch references)",
            "torch": torch.__version__, "peak_tops": args.peak_tops,
            "candidate_blocks": {str(m): [asdict(b) for b in candidate_blocks(m)] for m in ms}}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
