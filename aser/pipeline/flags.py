"""The method flags `aser simulate` and `aser quantize` share (one module both import, so the
two command modules do not import each other)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from aser.pipeline.config import A_BITS_WEIGHT_ONLY, FORMAT_NAMES
from aser.workers.reconstruct import BASE_OUTLIERS, METHODS


# dests of add_method_flags: each one a MethodConfig field of the same name.
METHOD_FLAGS = (
    "method", "rank", "w_bits", "a_bits", "group_size", "alpha", "num_outliers", "outlier_mode",
    "base_outliers", "reserve_rank", "smooth_channels", "alpha_grid", "outlier_grid", "damp", "svd",
    "rank_energy",
)


def _a_bits(s: str) -> int | None:
    """``--a-bits``: 8 (W4A8), 16 (weight-only) or another simulated width in [2, 8]."""
    bits = int(s) if s.strip().isdigit() else None
    if bits == A_BITS_WEIGHT_ONLY:
        return None
    if bits is None or not 2 <= bits <= 8:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not supported: use 8 (INT8 activations, W4A8) or 16 (no activation "
            f"quantization, W4A16); `aser simulate` also takes widths 2-7"
        )
    return bits


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `simulate` and `quantize`.

    None has a default here: a flag not given is absent from the namespace, so MethodConfig's
    field defaults apply (one place) and `quantize` can tell a given flag from a recipe's value.
    """
    add = functools.partial(p.add_argument, default=argparse.SUPPRESS)
    add("--method", choices=METHODS)
    add("--format", choices=FORMAT_NAMES,
        help="w4a16-pack (default): pack-quantized INT4 for GPU kernels (vLLM Marlin), computed with "
             "Marlin's INT8 activations (VLLM_MARLIN_INPUT_DTYPE=int8) unless --a-bits 16; w4a8-int: "
             "compressed-tensors int-quantized with INT8 activations (transformers, vLLM on CPU/XPU)")
    add("--rank", type=int)
    add("--w-bits", type=int)
    add("--a-bits", type=_a_bits, help="8 (W4A8), or 16 for no activation quantization (W4A16)")
    add("--group-size", type=int, help="simulate only: `aser quantize` exports per-channel scales")
    add("--alpha", type=float)
    add("--num-outliers", type=int)
    add("--outlier-mode", choices=("lowrank", "side", "none"))
    add("--base-outliers", choices=BASE_OUTLIERS,
        help="what the base holds in the outlier columns: zero (it needs its adapter), clipped, or "
             "full (the scale covers them: the base alone is a usable RTN-class model)")
    add("--reserve-rank", action=argparse.BooleanOptionalAction)
    add("--smooth-channels", choices=("outliers", "all"))
    add("--alpha-grid", type=float, nargs="*")
    add("--outlier-grid", type=int, nargs="*")
    add("--damp", type=float)
    add("--svd", choices=("exact", "randomized", "auto"))
    add("--rank-energy", type=float)


def given_method_fields(a: argparse.Namespace) -> dict[str, Any]:
    """The MethodConfig fields given as flags (absent flags are left to the defaults)."""
    return {name: getattr(a, name) for name in METHOD_FLAGS if hasattr(a, name)}


def given_format(a: argparse.Namespace) -> str | None:
    """``--format`` if given (``config.apply_format`` turns it into method fields)."""
    return getattr(a, "format", None)
