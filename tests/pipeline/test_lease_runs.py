"""DEST's lease with real runs: `aser quantize` subprocesses (each with its own Ray) on one S3
DEST (moto on loopback), compared byte for byte with the chaos harness's uninterrupted run."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from aser.checkpoint import storage
from aser.pipeline import lease
from chaos_harness import RUN_TIMEOUT_S, dest_files, finish, start

pytestmark = [pytest.mark.timeout(900), pytest.mark.cluster]


def test_two_runs_at_once_one_writes_the_other_names_the_owner(reference: tuple[Any, dict[str, bytes], float]) -> None:
    setup, ref, _ = reference
    dest = "s3://aser-chaos/twin"
    runs = [start(setup, dest), start(setup, dest)]
    results = [finish(r, RUN_TIMEOUT_S) for r in runs]
    rcs = sorted(rc for rc, _ in results)
    outputs = [r.stderr() for r in runs]
    assert rcs == [0, 2], (rcs, [o[-2000:] for o in outputs])
    loser = outputs[[rc for rc, _ in results].index(2)]
    winner_pid = runs[[rc for rc, _ in results].index(0)].proc.pid
    assert "is being written by" in loser and f"pid {winner_pid})" in loser, loser[-2000:]
    assert "Traceback" not in loser
    assert dest_files(dest) == ref  # nothing of the lease is left behind
    assert lease.current(dest) is None


def test_lease_of_a_killed_run_elsewhere_is_taken_over_after_expiry(reference: tuple[Any, dict[str, bytes], float]) -> None:
    """A run SIGKILLed mid-way on "another machine" (its lease object says so) leaves its lease:
    a new run without --wait is refused naming it; with --wait it waits for the expiry, takes
    over, logs the takeover and ends byte-identical to an uninterrupted run."""
    setup, ref, _ = reference
    dest = "s3://aser-chaos/taken-over"
    killed = start(setup, dest, extra_env={"ASER_TEST_KILL_AFTER": "layer:1"})
    rc, _ = finish(killed, RUN_TIMEOUT_S)
    assert rc == -9, killed.stderr()[-2000:]
    left = lease.current(dest)
    assert left is not None and left.pid == killed.proc.pid

    def as_if_elsewhere(ttl_s: float) -> None:
        """The lease as another machine's run leaves it: another host, a heartbeat just written."""
        rec = dict(left.__dict__, host="gpu-node-7", owner="alice@gpu-node-7", machine="elsewhere",
                   heartbeat_at=time.time(), ttl_s=ttl_s)
        storage.write_bytes_atomic(storage.join(dest, lease.LEASE_DIR, f"{left.epoch:010d}.json"),
                                   json.dumps(rec).encode())

    as_if_elsewhere(ttl_s=120.0)
    refused = start(setup, dest)
    rc, _ = finish(refused, RUN_TIMEOUT_S)
    assert rc == 2 and "alice@gpu-node-7 (host gpu-node-7" in refused.stderr(), refused.stderr()[-2000:]
    assert "Traceback" not in refused.stderr()

    # Expires ~25 s from now; the run reaches the lease after its start-up (~10 s here) and waits.
    as_if_elsewhere(ttl_s=25.0)
    waited = start(setup, dest, extra_args=("--wait",))
    rc, _ = finish(waited, RUN_TIMEOUT_S)
    out = waited.stderr()
    assert rc == 0, out[-3000:]
    assert "waiting for the lease" in out and "took over the lease" in out and "heartbeat was" in out, out[-3000:]
    assert dest_files(dest) == ref
