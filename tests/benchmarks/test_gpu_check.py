"""benchmarks/gpu_check.sh --dry-run: the GPU machine's script runs its CPU-checkable steps here
(interpreted kernels, the GEMM sweep, a stories260K quantize with Ray and aser eval, in both formats,
a scaled layer)
and writes the one JSON a GPU run writes, so a lent GPU's few minutes are not spent on a broken
script. Marked cluster: it starts Ray in subprocesses (about 3 minutes alone)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_gpu_check_dry_run_writes_every_steps_result(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "ASER_TEST_DATA": str(data_dir)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500)
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = report["steps"]
    assert list(steps) == ["kernels", "gemm", "quantize", "eval", "quantize_pack", "eval_pack", "scale"]
    assert all(s["rc"] == 0 for s in steps.values())
    assert steps["kernels"]["result"]["rows"] and steps["gemm"]["result"]["rows"]
    assert steps["quantize"]["result"]["status"] == "complete"
    ev, pack = steps["eval"]["result"], steps["eval_pack"]["result"]
    assert ev["a_bits"] == 8 and ev["num_windows"] == 2 and 1 < ev["ppl"] < 1e4
    assert (ev["act_quant"], pack["act_quant"]) == ("compressed-tensors", "marlin")
    assert pack["a_bits"] == 8 and 1 < pack["ppl"] < 1e4
    assert steps["quantize_pack"]["result"]["status"] == "complete"
    assert steps["scale"]["result"]["processes"]
