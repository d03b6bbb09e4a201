"""Compile every kernel variant the dispatchers launch for an sm_90 GPU, without a GPU.

Run as a script with TRITON_INTERPRET unset (the interpreter accepts code the compiler rejects,
e.g. a global that is not a tl.constexpr). Prints one JSON line: {variant: PTX text}.
"""

from __future__ import annotations

import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aser.kernels import act_quant, gemm

TARGET = GPUTarget("cuda", 90, 32)


def _act_quant(dtype: str, smooth: bool) -> str:
    f = f"*{dtype}"
    sig = {"x_ptr": f, "m_ptr": f, "q_ptr": "*i8", "scale_ptr": f, "xs_ptr": f, "K": "i32",
           "eps": "fp32", "HAS_SMOOTH": "constexpr", "BLOCK_K": "constexpr"}
    src = ASTSource(act_quant._act_quant_kernel, signature=sig,
                    constexprs={"HAS_SMOOTH": smooth, "BLOCK_K": 1024})
    return triton.compile(src, target=TARGET).asm["ptx"]


def _gemm(dtype: str, a8: bool, lowrank: int) -> str:
    f = f"*{dtype}"
    sig = {"a_ptr": "*i8" if a8 else f, "sa_ptr": "*fp32", "w_ptr": "*i32", "sw_ptr": "*fp32",
           "x_ptr": f, "t_ptr": f, "lb_ptr": f, "la_ptr": f, "bias_ptr": f, "y_ptr": f,
           "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "R": "i32"}
    consts = {"A8": a8, "LOWRANK": lowrank, "HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64,
              "BLOCK_K": 128 if a8 else 64, "BLOCK_R": 16, "GROUP_M": 8,
              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False}
    sig.update(dict.fromkeys(consts, "constexpr"))
    return triton.compile(ASTSource(gemm._w4_gemm_kernel, signature=sig, constexprs=consts),
                          target=TARGET).asm["ptx"]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") == "0" and not act_quant.INTERPRETED
    ptx = {
        "act_quant_bf16_smooth": _act_quant("bf16", True),
        "act_quant_fp32": _act_quant("fp32", False),
        "w4a8_bf16_fused": _gemm("bf16", True, 2),
        "w4a8_fp16_separate": _gemm("fp16", True, 1),
        "w4a16_bf16_fused": _gemm("bf16", False, 2),
        "w4a16_fp32": _gemm("fp32", False, 0),
    }
    print(json.dumps(ptx))


if __name__ == "__main__":
    main()
