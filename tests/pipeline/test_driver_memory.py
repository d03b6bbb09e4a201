"""Invariant 1: peak memory of every process depends on layer size, not on depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_run_helpers import write_synthetic_llama

# Peak RSS per process kind may grow by at most this factor from 8 to 48 layers (the issue's
# bound). What does scale with depth — the manifest (a few KB per layer) and the merged adapter
# (r (N + K) values per linear, 20 KB per layer here) — is small next to a process's ~500 MB of
# torch + transformers + Ray.
MAX_GROWTH = 1.25


def _kind(role: str) -> str:
    return role if role in ("driver", "calibration") else "task"


def _peak_by_kind(ray_cluster: str, src: Path, dest: Path, calib: str) -> dict[str, int]:
    args = [str(src), str(dest), "--calib", calib, "--num-samples", "8", "--seq-len", "64", "--rank", "8",
            "--num-outliers", "4", "--cpus-per-worker", "0.5", "--workers", "2", "--address", ray_cluster,
            "--no-progress", "--json"]
    proc = subprocess.run([sys.executable, "-m", "aser.pipeline.quantize_cmd", "quantize", *args],
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    out: dict[str, int] = {}
    for p in summary["processes"]:
        k = _kind(p["role"])
        out[k] = max(out.get(k, 0), int(p["peak_rss_bytes"]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_peak_rss_does_not_grow_with_depth(ray_cluster: str, data_dir: Path, tmp_path: Path) -> None:
    calib = str(data_dir / "tinystories" / "sample.txt")
    peaks = {}
    for n in (8, 48):
        src = write_synthetic_llama(tmp_path / f"src{n}", data_dir / "stories260K", n)
        peaks[n] = _peak_by_kind(ray_cluster, src, tmp_path / f"out{n}", calib)
    assert set(peaks[8]) == set(peaks[48]) == {"driver", "calibration", "task"}
    for kind in peaks[8]:
        assert peaks[48][kind] <= MAX_GROWTH * peaks[8][kind], (kind, peaks)
    print(json.dumps(peaks))
