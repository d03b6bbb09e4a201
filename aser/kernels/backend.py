"""Which implementation a kernel dispatcher runs: Triton on CUDA tensors, the torch reference otherwise.

``backend="auto"`` picks Triton only when Triton imports and every tensor is on a CUDA device;
``"triton"`` forces the kernel (on CPU tensors it works only under ``TRITON_INTERPRET=1``, which
is how the tests run it); ``"torch"`` forces the pure-torch reference.
"""

from __future__ import annotations

from typing import Literal

import torch

try:  # Triton is optional at import time: the library must import on machines without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def use_triton(backend: Backend, *tensors: torch.Tensor | None) -> bool:
    """True when the dispatcher should launch the Triton kernel for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors if t is not None)
