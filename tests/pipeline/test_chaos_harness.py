"""The chaos harness's own bookkeeping (benchmarks/chaos.py): a run that hangs is one failed
trial, killed with its processes, not the end of the whole benchmark."""

from __future__ import annotations

import os
import sys

from chaos_harness import Setup, _last_error, finish, run_pids, spawn


def test_a_run_that_hangs_is_killed_and_counted_as_a_failure() -> None:
    setup = Setup("http://127.0.0.1:9", "s3://none/src", os.devnull)
    run = spawn(setup, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"])
    rc, wall = finish(run, timeout=3)
    assert rc == -1 and 3 <= wall < 60
    assert run.proc.poll() is not None and run_pids(run.marker) == []
    assert run.stderr().startswith("started")
    assert _last_error(run.stderr()) == "hung: no exit within 3 s, killed"
