"""The kernels' GPU path, checked without a GPU: Triton's real compiler (not the interpreter the
other kernel tests use) builds every launched variant for sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton.backends


def test_kernels_compile_for_a_gpu(tmp_path: Path):
    """The interpreter accepts code the compiler rejects (a global that is not a tl.constexpr
    made every launch fail on a GPU). On the GPU, bf16 rounding is cvt.rn (nearest even), with
    no trace of the interpreter's bit trick (its 0xFFFF0000 mask, -65536 in PTX)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    script = Path(__file__).with_name("compile_for_gpu.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx: dict[str, str] = json.loads(done.stdout.splitlines()[-1])
    assert len(ptx) == 6
    for name, text in ptx.items():
        if "bf16" in name:
            assert "cvt.rn.bf16" in text and "-65536" not in text, name  # bf16 or bf16x2
