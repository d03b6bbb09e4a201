"""benchmarks/vllm_cpu.py runs vLLM's side again when it dies of a signal (vllm-cpu 0.32 once
aborted in CI right after loading the weights, and passed on the same machine) and records the
crash; an error exit is the benchmark's failure, not retried."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import vllm_cpu  # noqa: E402

# Aborts (SIGABRT) the first time, succeeds the second: the marker file counts the attempts.
FLAKY = """
import os, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    print("terminate called without an active exception", file=sys.stderr, flush=True)
    os.abort()
"""


def test_a_crash_by_signal_is_run_again_and_recorded(tmp_path: Path) -> None:
    wall, crashes = vllm_cpu.run_vllm_side([sys.executable, "-c", FLAKY, str(tmp_path / "m")])
    assert wall > 0
    assert len(crashes) == 1 and crashes[0]["signal"] == 6
    assert crashes[0]["stderr_tail"][-1] == "terminate called without an active exception"


def test_a_crash_every_time_fails_after_the_last_attempt(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="attempt 2 of 2"):
        vllm_cpu.run_vllm_side([sys.executable, "-c", "import os; os.abort()"])


def test_an_error_exit_is_not_run_again(tmp_path: Path) -> None:
    marker = tmp_path / "count"
    script = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(3)"
    with pytest.raises(SystemExit, match=r"failed \(3, attempt 1 of 2\)"):
        vllm_cpu.run_vllm_side([sys.executable, "-c", script])
    assert marker.read_text() == "x"
