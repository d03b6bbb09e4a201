"""A lease on DEST: at most one run writes a destination at a time.

Two runs on one DEST (overlapping cron firings, a retried submitter while the first attempt
still runs, a person) would interleave manifest saves and lose each other's records. The run
that writes DEST first takes a lease: an object ``aser_lease/EPOCH.json`` in DEST (owner, host,
process, start time, heartbeat, time to live), created with the store's conditional write
(``storage.create_exclusive``: ``If-None-Match: *`` on S3, an exclusive link on a file system),
so of two runs racing for one epoch exactly one gets it. The holder rewrites its heartbeat
every ``ttl/4`` seconds and deletes its object when it stops.

A lease is taken over by creating the next epoch, again exclusively, when it is stale: its
heartbeat is older than its time to live (the holder's machine died, or it lost the store for
that long), or it was written on this machine by a process that no longer exists (a killed run
rerun on the same machine need not wait for the expiry). A holder whose lease was taken over
notices at its next heartbeat (a higher epoch exists, or its own object is gone) and the driver
stops at its next layer (``Lease.check``). Between the takeover and that check the old holder
may still write a stage file; stage files are deterministic for a given source and config (the
manifest refuses any other), so the two writers write the same bytes.

Times are wall-clock seconds of the machine that wrote them; machines are assumed to agree to
well within the time to live (NTP).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from aser.checkpoint import storage

LEASE_DIR = "aser_lease"
DEFAULT_TTL_S = 120.0
# How often a waiting run (``--wait``) looks at the lease again, at most.
WAIT_POLL_S = 10.0


class LeaseHeld(RuntimeError):
    """Another live run holds DEST's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it was presumed dead): it must stop writing."""


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _proc_start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), which
    tells a reused PID from the process that wrote the lease; "" where there is no /proc."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _machine() -> str:
    """What makes a PID meaningful: the boot and the PID namespace (two containers on one host
    share a hostname only sometimes, a PID namespace never)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{_read_first_line('/proc/sys/kernel/random/boot_id')}/{pidns}"


def _pid_alive(pid: int, start_ticks: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return not start_ticks or _proc_start_ticks(pid) in ("", start_ticks)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no $USER
        return f"uid{os.getuid()}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LeaseRecord:
    epoch: int
    owner: str
    host: str
    pid: int
    machine: str
    start_ticks: str
    run_id: str
    started_at: float
    heartbeat_at: float
    ttl_s: float

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d["started"] = _iso(self.started_at)
        d["heartbeat"] = _iso(self.heartbeat_at)
        return json.dumps(d, indent=1).encode()

    def stale_because(self, now: float) -> str | None:
        """Why this lease may be taken over, or None while its holder is presumed alive."""
        age = now - self.heartbeat_at
        if age > self.ttl_s:
            return f"its last heartbeat was {age:.0f} s ago (time to live {self.ttl_s:.0f} s)"
        if self.machine == _machine() and self.host == socket.gethostname() and not _pid_alive(self.pid, self.start_ticks):
            return f"its process {self.pid} on this machine no longer exists"
        return None

    def describe(self, now: float) -> str:
        return (f"{self.owner} (host {self.host}, pid {self.pid}) since {_iso(self.started_at)}, "
                f"last heartbeat {now - self.heartbeat_at:.0f} s ago, expires in "
                f"{max(0.0, self.heartbeat_at + self.ttl_s - now):.0f} s")


def _name(epoch: int) -> str:
    return f"{epoch:010d}.json"


def _epochs(dest: str) -> list[int]:
    out = []
    for n in storage.list_dir(storage.join(dest, LEASE_DIR)):
        stem = n[: -len(".json")] if n.endswith(".json") else ""
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def _read(dest: str, epoch: int) -> LeaseRecord | None:
    try:
        return LeaseRecord.from_json(storage.read_bytes(storage.join(dest, LEASE_DIR, _name(epoch))))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # A lease object that does not parse (written by hand, cut short): no one can prove it
        # is alive; it is treated as expired at once.
        return LeaseRecord(epoch, "<unreadable lease>", "?", -1, "?", "", "", 0.0, 0.0, 0.0)


def current(dest: str) -> LeaseRecord | None:
    """The lease DEST holds now (the highest epoch), or None."""
    for epoch in reversed(_epochs(dest)):
        rec = _read(dest, epoch)
        if rec is not None:
            return rec
    return None


@dataclass
class Lease:
    """A held lease; ``check`` raises once it was lost; ``release`` gives it up."""

    dest: str
    record: LeaseRecord
    log: Callable[[str], None]
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: str | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return storage.join(self.dest, LEASE_DIR, _name(self.record.epoch))

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="aser-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.5, self.record.ttl_s / 4)
        last_ok = time.time()
        while not self._stop.wait(interval):
            try:
                lost = self._lost_because()
                if lost is None:
                    self.record.heartbeat_at = time.time()
                    storage.write_bytes_atomic(self.url, self.record.to_json())
                    last_ok = time.time()
            except Exception as e:  # noqa: BLE001 - a flaky store must not kill the run; expiry does
                lost = None
                if time.time() - last_ok > self.record.ttl_s:
                    lost = f"its heartbeat could not be written for {time.time() - last_ok:.0f} s ({e})"
            if lost is not None:
                self._lost = lost
                self.log(f"[aser] lost the lease on {storage.redact(self.dest)}: {lost}; stopping")
                return

    def _lost_because(self) -> str | None:
        epochs = _epochs(self.dest)
        newer = [e for e in epochs if e > self.record.epoch]
        if newer:
            rec = _read(self.dest, newer[-1])
            who = rec.owner + f" (host {rec.host}, pid {rec.pid})" if rec else "another run"
            return f"{who} took it over"
        if self.record.epoch not in epochs:
            return "its lease object was deleted"
        return None

    def check(self) -> None:
        """Raise LeaseLost if another run took the lease over; the caller stops writing."""
        if self._lost is not None:
            raise LeaseLost(f"the lease on {storage.redact(self.dest)} was lost: {self._lost}; "
                            "another run now writes it, this one stops")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease object (unless it was lost to another run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost is None:
            remove(self.dest, self.record.epoch)


def remove(dest: str, epoch: int) -> None:
    """Delete the lease of ``epoch`` on DEST, and any epoch below it a stale holder's late
    heartbeat wrote back (``Lease.release``, and the driver's start watchdog, which holds no
    ``Lease``)."""
    for e in _epochs(dest):
        if e <= epoch:
            storage.remove(storage.join(dest, LEASE_DIR, _name(e)))
    fs, path = storage.resolve(storage.join(dest, LEASE_DIR))
    if storage._is_local(fs):
        try:
            os.rmdir(path)  # only if empty: another run's new lease stays
        except OSError:
            pass


def acquire(
    dest: str,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    wait: bool = False,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Take DEST's lease (and start its heartbeat). A live holder: LeaseHeld naming it, or with
    ``wait`` poll until it is released or goes stale. A stale one is taken over, and said so."""
    say = log or (lambda m: print(m, file=sys.stderr))
    announced = False
    while True:
        epochs = _epochs(dest)
        held = current(dest) if epochs else None
        now = time.time()
        if held is not None:
            stale = held.stale_because(now)
            if stale is None:
                if not wait:
                    raise LeaseHeld(
                        f"{storage.redact(dest)} is being written by {held.describe(now)}; "
                        "pass --wait to wait for it, or choose another DEST"
                    )
                if not announced:
                    say(f"[aser] waiting for the lease on {storage.redact(dest)}: held by {held.describe(now)}")
                    announced = True
                sleep(min(WAIT_POLL_S, max(0.5, held.heartbeat_at + held.ttl_s - now + 0.5)))
                continue
        epoch = (max(epochs) + 1) if epochs else 1
        t = time.time()
        rec = LeaseRecord(
            epoch=epoch, owner=f"{_user()}@{socket.gethostname()}", host=socket.gethostname(),
            pid=os.getpid(), machine=_machine(), start_ticks=_proc_start_ticks(os.getpid()),
            run_id=uuid.uuid4().hex, started_at=t, heartbeat_at=t, ttl_s=float(ttl_s),
        )
        if not storage.create_exclusive(storage.join(dest, LEASE_DIR, _name(epoch)), rec.to_json()):
            continue  # another run took this epoch first: look again
        if held is not None:
            say(f"[aser] took over the lease on {storage.redact(dest)} from {held.owner} "
                f"(host {held.host}, pid {held.pid}, started {_iso(held.started_at)}): {held.stale_because(now)}")
        for old in epochs:  # the stale epochs (and any unreadable leftovers) below ours
            storage.remove(storage.join(dest, LEASE_DIR, _name(old)))
        lease = Lease(dest, rec, say)
        lease.start_heartbeat()
        return lease

