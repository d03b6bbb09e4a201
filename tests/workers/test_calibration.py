"""The calibration worker's compute dtype: what its layers run in, per device."""

from __future__ import annotations

import pytest
import torch

from aser.workers.calibration import compute_dtype


@pytest.mark.parametrize(
    "stored,device,expected",
    [
        (torch.bfloat16, "cpu", torch.float32),  # bf16 matmul: 1.1 GFLOP/s here, fp32 110
        (torch.float16, "cpu", torch.float32),
        (torch.float32, "cpu", torch.float32),
        (torch.bfloat16, "cuda", torch.bfloat16),  # a GPU runs the checkpoint's dtype
        (torch.float16, "cuda", torch.float16),
    ],
)
def test_16_bit_layers_run_in_fp32_on_a_cpu_only(stored, device, expected):
    assert compute_dtype(stored, torch.device(device)) == expected
