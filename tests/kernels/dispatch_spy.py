"""Test the dispatch decision of the kernel entry points without a GPU.

``pretend_cuda`` makes chosen tensors report ``is_cuda`` (what ``backend.use_triton`` reads), and
``record_routes`` replaces a dispatcher's two implementations by recorders, so a test sees which
one ``backend="auto"`` would have launched on a CUDA device.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

# (tensors on CUDA?, backend requested, implementation expected)
DISPATCH_CASES = [
    (True, "auto", "triton"),  # the point of the kernels: CUDA tensors get them
    (False, "auto", "torch"),
    (True, "torch", "torch"),
    (False, "triton", "triton"),  # forced: on CPU it runs under the interpreter
]


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, *tensors: torch.Tensor) -> None:
    """These tensors (by identity) report is_cuda = True; every other tensor reports False."""
    ids = {id(t) for t in tensors}
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: id(t) in ids), raising=False)


def record_routes(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, triton_fn: str, torch_fn: str
) -> list[str]:
    """Replace ``module.triton_fn`` / ``module.torch_fn`` by recorders; returns the call log."""
    calls: list[str] = []
    monkeypatch.setattr(module, triton_fn, lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(module, torch_fn, lambda *a, **k: calls.append("torch"))
    return calls
