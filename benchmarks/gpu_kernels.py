"""The Triton kernels compiled for and run on a real GPU, checked against the torch references
and exact float64 math with the kernel tests' own tolerances (``tests/kernels/kernel_tolerances``).

    python benchmarks/gpu_kernels.py --out kernels.json          # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke  # the same checks on CPU, tiny shapes

The CI suite runs every kernel under Triton's CPU interpreter; this is the check that the
compiled kernels (PTX/SASS for the GPU at hand) compute the same thing: odd shapes (M, N, K off
every tile size), a Llama-3-70B down_proj, both dtypes, rank 0 and r > 0, both low-rank modes,
with and without bias. Prints one line per case and writes JSON; exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from kernel_tolerances import rel_err, tol  # noqa: E402  (the tests' one table of tolerances)
from test_gemm import _case as gemm_case  # noqa: E402  (the tests' operands)

from aser.kernels.act_quant import quantize_activation_int8_reference, quantize_activation_int8_triton  # noqa: E402
from aser.kernels.gemm import (  # noqa: E402
    w4a8_gemm_reference,
    w4a8_gemm_triton,
    w4a16_gemm_reference,
    w4a16_gemm_triton,
)

# (M, N, K, r)
SHAPES = [(1, 24, 40, 0), (7, 70, 100, 5), (13, 33, 4095, 3), (13, 130, 257, 20), (7, 17, 9, 1),
          (16, 4096, 4096, 32), (2048, 1024, 4096, 32), (128, 8192, 28672, 32), (2048, 8192, 8192, 0)]
SMOKE_SHAPES = SHAPES[:2]
_TOL = {torch.float32: ("gemm_fp32", "float64_fp32"), torch.bfloat16: ("gemm_bf16", "float64_bf16")}


def _case(M: int, N: int, K: int, r: int, dtype: torch.dtype, device: str, bias: bool):
    """The kernel tests' own operands (``tests/kernels/test_gemm._case``), on ``device``."""
    q, packed, s, x, L_A, L_B, b = gemm_case(M, N, K, r, dtype, seed=M * 7 + N * 3 + K + r, bias=bias)
    return tuple(None if t is None else t.to(device) for t in (q, packed, s, x, L_A, L_B, b))


def _float64(codes, a_scale, q, s, x, L_A, L_B, b) -> torch.Tensor:
    w = q.double() * s.double()
    y = (x.double() if codes is None else codes.double() * a_scale.double()) @ w.T
    if L_A is not None:
        y = y + (x.double() @ L_B.double().T) @ L_A.double().T
    if b is not None:
        y = y + b.double()
    return y


def _gemm(kind, mode, qa, q, packed, s, K, x, L_A, L_B, b):
    """(Triton output, torch reference, float64 math) of one GEMM kind on the same operands."""
    if kind == "w4a8":
        return (w4a8_gemm_triton(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b, lowrank_mode=mode),
                w4a8_gemm_reference(qa.q, qa.scale, packed, s, K, x, L_A, L_B, b),
                _float64(qa.q, qa.scale, q, s, x, L_A, L_B, b))
    return (w4a16_gemm_triton(x, packed, s, K, L_A, L_B, b, lowrank_mode=mode),
            w4a16_gemm_reference(x, packed, s, K, L_A, L_B, b),
            _float64(None, None, q, s, x, L_A, L_B, b))


def check(shapes: list[tuple[int, int, int, int]], device: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for M, N, K, r in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for bias in (False, True):
                q, packed, s, x, L_A, L_B, b = _case(M, N, K, r, dtype, device, bias)
                t0 = time.perf_counter()
                qa_k = quantize_activation_int8_triton(x)
                qa_r = quantize_activation_int8_reference(x)
                row: dict[str, object] = {"M": M, "N": N, "K": K, "r": r, "dtype": str(dtype).split(".")[1],
                                          "bias": bias,
                                          "act_codes_equal": bool(torch.equal(qa_k.q, qa_r.q)),
                                          "act_scales_equal": bool(torch.equal(qa_k.scale, qa_r.scale))}
                if not (row["act_codes_equal"] and row["act_scales_equal"]):
                    # Which side left IEEE arithmetic: codes of x / scale computed in float64 with
                    # each side's own scale, rounded half to even, against each side's codes.
                    def ieee_codes(scale: torch.Tensor) -> torch.Tensor:
                        v = (x.double() / scale.double()).to(dtype).double().clamp(-128, 127)
                        return torch.round(v).to(torch.int8)

                    row["act_codes_differ"] = int((qa_k.q != qa_r.q).sum())
                    row["act_code_max_diff"] = int((qa_k.q.int() - qa_r.q.int()).abs().max())
                    row["act_scales_differ"] = int((qa_k.scale != qa_r.scale).sum())
                    row["act_kernel_vs_ieee"] = int((qa_k.q != ieee_codes(qa_k.scale)).sum())
                    row["act_reference_vs_ieee"] = int((qa_r.q != ieee_codes(qa_r.scale)).sum())
                ok = row["act_codes_equal"] and row["act_scales_equal"]
                t_kernel, t_f64 = _TOL[dtype]
                for mode in ("separate", "fused") if r else ("separate",):
                    for kind in ("w4a8", "w4a16"):
                        try:
                            out, ref, exact = _gemm(kind, mode, qa_r, q, packed, s, K, x, L_A, L_B, b)
                        except Exception as e:  # noqa: BLE001 - a case that cannot launch is a failed case
                            row[f"{kind}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            ok = False
                            continue
                        e_ref, e_exact = rel_err(out, ref), rel_err(out, exact)
                        row[f"{kind}_{mode}_vs_ref"], row[f"{kind}_{mode}_vs_f64"] = e_ref, e_exact
                        ok = ok and e_ref <= tol(t_kernel) and e_exact <= tol(t_f64)
                row["ok"] = bool(ok)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                errs = " ".join(f"{k}={v:.1e}" for k, v in row.items() if k.endswith(("_vs_ref", "_vs_f64")))
                act = {k: v for k, v in row.items() if k.startswith("act_") and not k.endswith("_equal")}
                print(f"{'ok  ' if ok else 'FAIL'} M={M} N={N} K={K} r={r} {row['dtype']} bias={bias} "
                      f"act_equal={row['act_codes_equal'] and row['act_scales_equal']} {act or ''} {errs}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="two tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    p.add_argument("--out", default="gpu_kernels.json")
    args = p.parse_args(argv)
    if args.smoke:
        device, shapes = "cpu", SMOKE_SHAPES
    elif not torch.cuda.is_available():
        print("gpu_kernels needs a CUDA GPU (none found); --smoke runs the checks on CPU", file=sys.stderr)
        return 2
    else:
        device, shapes = "cuda", SHAPES
    rows = check(shapes, device)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "cases": len(rows), "failed": sum(not r["ok"] for r in rows)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{meta['cases'] - meta['failed']}/{meta['cases']} cases within the kernel tests' tolerances; "
          f"wrote {args.out}", file=sys.stderr)
    return 1 if meta["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
