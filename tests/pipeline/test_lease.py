"""DEST's lease (aser.pipeline.lease): one writer at a time, on a file system and on each cloud's
emulator on loopback: S3 (moto; s3fs's PUT with If-None-Match), GCS (fake-gcs-server; gcsfs's
upload with ifGenerationMatch=0), Azure Blob (Azurite; adlfs's upload with If-None-Match)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aser.checkpoint import storage
from aser.pipeline import lease


@pytest.fixture(params=["local", "s3", "gs", "az"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "dest")
    bucket = request.getfixturevalue({"s3": "s3_bucket", "gs": "gs_bucket", "az": "az_container"}[request.param])
    return f"{bucket}/dest"


def _lease_url(dest: str, epoch: int) -> str:
    return storage.join(dest, lease.LEASE_DIR, f"{epoch:010d}.json")


def _plant(dest: str, epoch: int, **fields: Any) -> None:
    """A lease object as another machine's run would have written it."""
    t = time.time()
    rec = {"epoch": epoch, "owner": "alice@gpu-node-7", "host": "gpu-node-7", "pid": 4242,
           "machine": "another-boot/pid:[1]", "start_ticks": "", "run_id": "x", "started_at": t - 600,
           "heartbeat_at": t, "ttl_s": 60.0, **fields}
    storage.write_bytes_atomic(_lease_url(dest, epoch), json.dumps(rec).encode())


def _messages() -> tuple[list[str], Any]:
    out: list[str] = []
    return out, out.append


def test_create_exclusive_creates_once(dest: str) -> None:
    url = storage.join(dest, "x.json")
    assert storage.create_exclusive(url, b"first")
    assert not storage.create_exclusive(url, b"second")
    assert storage.read_bytes(url) == b"first"


def test_racing_creates_have_one_winner(dest: str) -> None:
    """Eight threads PUT the same key at once: the store's conditional write lets one through."""
    url = storage.join(dest, "race.json")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        results.append(storage.create_exclusive(url, str(i).encode()))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert storage.read_bytes(url).decode() in {str(i) for i in range(8)}


def test_second_run_is_refused_naming_the_owner(dest: str) -> None:
    held = lease.acquire(dest, ttl_s=30)
    try:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.acquire(dest, ttl_s=30)
        msg = str(e.value)
        assert held.record.owner in msg and f"pid {held.record.pid}" in msg and "since" in msg and "--wait" in msg
    finally:
        held.release()
    assert lease.current(dest) is None
    again = lease.acquire(dest, ttl_s=30)
    again.release()


def test_live_lease_of_another_machine_is_not_taken(dest: str) -> None:
    _plant(dest, 3)
    with pytest.raises(lease.LeaseHeld, match="alice@gpu-node-7 .host gpu-node-7, pid 4242."):
        lease.acquire(dest)
    assert lease.current(dest).owner == "alice@gpu-node-7"


def test_expired_lease_is_taken_over_and_logged(dest: str) -> None:
    _plant(dest, 3, heartbeat_at=time.time() - 61)
    said, log = _messages()
    held = lease.acquire(dest, ttl_s=30, log=log)
    try:
        assert held.record.epoch == 4
        assert any("took over the lease" in m and "alice@gpu-node-7" in m and "heartbeat was 61 s ago" in m
                   for m in said), said
        assert storage.list_dir(storage.join(dest, lease.LEASE_DIR)) == ["0000000004.json"]
    finally:
        held.release()


def test_lease_of_a_dead_process_on_this_machine_is_taken_at_once(dest: str) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    mine = lease._machine()
    import socket

    _plant(dest, 1, host=socket.gethostname(), machine=mine, pid=p.pid)  # fresh heartbeat
    said, log = _messages()
    held = lease.acquire(dest, log=log)
    held.release()
    assert any(f"process {p.pid} on this machine no longer exists" in m for m in said), said


def test_lease_of_a_live_process_on_this_machine_is_respected(dest: str) -> None:
    import socket

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(dest, 1, host=socket.gethostname(), machine=lease._machine(), pid=p.pid,
               start_ticks=lease._proc_start_ticks(p.pid))
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(dest)
    finally:
        p.kill()
        p.wait()


def test_reused_pid_does_not_keep_a_lease(dest: str) -> None:
    """Same PID, another start time: the process that wrote the lease is gone."""
    import os
    import socket

    _plant(dest, 1, host=socket.gethostname(), machine=lease._machine(), pid=os.getpid(), start_ticks="1")
    held = lease.acquire(dest)
    assert held.record.epoch == 2
    held.release()


def test_wait_polls_until_the_holder_goes_stale(dest: str) -> None:
    _plant(dest, 1, ttl_s=60.0)
    said, log = _messages()
    sleeps: list[float] = []

    def sleep(s: float) -> None:  # the holder's heartbeats stop while we wait
        sleeps.append(s)
        if len(sleeps) == 2:
            _plant(dest, 1, heartbeat_at=time.time() - 120)

    held = lease.acquire(dest, wait=True, log=log, sleep=sleep)
    held.release()
    assert len(sleeps) == 2 and all(0.5 <= s <= lease.WAIT_POLL_S for s in sleeps), sleeps
    assert said[0].startswith("[aser] waiting for the lease") and "alice@gpu-node-7" in said[0]
    assert "took over" in said[-1]


def test_unreadable_lease_is_taken_over(dest: str) -> None:
    storage.write_bytes_atomic(_lease_url(dest, 1), b"{not json")
    held = lease.acquire(dest)
    assert held.record.epoch == 2
    held.release()
    assert lease.current(dest) is None


def test_heartbeat_advances(dest: str) -> None:
    held = lease.acquire(dest, ttl_s=2.0)
    try:
        first = held.record.heartbeat_at
        deadline = time.time() + 10
        while lease.current(dest).heartbeat_at == first and time.time() < deadline:
            time.sleep(0.1)
        assert lease.current(dest).heartbeat_at > first
        held.check()
    finally:
        held.release()


def test_holder_notices_a_takeover_and_does_not_delete_the_new_lease(dest: str) -> None:
    said, log = _messages()
    held = lease.acquire(dest, ttl_s=2.0, log=log)
    _plant(dest, held.record.epoch + 1)  # another run decided this one was dead
    deadline = time.time() + 10
    while held._lost is None and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(lease.LeaseLost, match="alice@gpu-node-7 .host gpu-node-7, pid 4242. took it over"):
        held.check()
    held.release()
    assert lease.current(dest).owner == "alice@gpu-node-7"
    assert any("lost the lease" in m for m in said), said


def test_release_removes_late_heartbeats_of_a_taken_over_holder(dest: str) -> None:
    """A stale holder's heartbeat can land after the takeover deleted its object; the new
    holder's release clears it, so the next run does not find a leftover."""
    held = lease.acquire(dest, ttl_s=30)
    _plant(dest, held.record.epoch - 1 if held.record.epoch > 1 else 0, heartbeat_at=time.time() - 100)
    held.release()
    assert storage.list_dir(storage.join(dest, lease.LEASE_DIR)) == []
