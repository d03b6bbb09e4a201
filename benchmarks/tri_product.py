"""The reconstruction's products with the lower-triangular whitening factor (E S, W S): a full
``A @ S`` against ``lowrank.mm_lower`` (column blocks of the triangle only), float64 as the
reconstruction runs them, side by side in one process, reported as ratios.

    python benchmarks/tri_product.py [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from aser.workers.lowrank import mm_lower

# (N, K): SmolLM2-135M's down_proj, a 2048-hidden model's down_proj and gate_proj.
SHAPES = [(576, 1536), (2048, 7168), (7168, 2048)]


def seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1, help="torch threads (a reconstruction task's default: 1)")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for N, K in SHAPES:
        A = torch.randn(N, K, generator=g, dtype=torch.float64)
        S = torch.tril(torch.randn(K, K, generator=g, dtype=torch.float64))
        full = seconds(lambda: A @ S, a.reps)
        tri = seconds(lambda: mm_lower(A, S), a.reps)
        rows.append({"N": N, "K": K, "full_s": full, "mm_lower_s": tri, "ratio": tri / full})
    print(json.dumps({"threads": a.threads, "dtype": "float64", "rows": rows}))


if __name__ == "__main__":
    main()
