"""The GEMM benchmark runs end to end on CPU (--smoke) and refuses the full sweep without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aser.kernels.bench import gemm as bench


def test_smoke_writes_table_and_json(tmp_path: Path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["r"] for r in rows} == {0, 4}
    assert all(r["w4a8_s"] > 0 and r["w4a16_s"] > 0 for r in rows)
    assert all(r["w4a8_lr_overhead"] == 0.0 for r in rows if r["r"] == 0)
    assert "| M | K | N | r |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_full_sweep_needs_cuda(capsys):
    assert bench.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
