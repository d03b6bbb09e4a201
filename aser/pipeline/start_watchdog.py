"""A watchdog process for the driver's local Ray start.

``python -m aser.pipeline.start_watchdog PID TIMEOUT_S`` reads one JSON line from stdin (DEST's
lease, ``{"dest": URL, "epoch": N}``, or ``{}``), then waits for stdin to close: the driver closes
it once ``ray.init`` returned (or it died). If it has not closed within TIMEOUT_S, the watchdog
prints the run's clear error, deletes the lease, and SIGKILLs the processes below PID (the Ray
processes the driver started) and PID itself: the driver cannot stop by itself there.

A process, not a thread of the driver: in benchmarks/chaos.py a Ray worker SIGKILLed while Ray
started left ``ray.init`` waiting inside Ray's C++ core-worker start, which holds the GIL, so a
watchdog thread in the driver never woke (the run hung until the harness killed it at 600 s).
Nothing is imported at start beyond the standard library: the watchdog costs the start-up no CPU.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def main(argv: list[str]) -> int:
    pid, timeout_s = int(argv[0]), float(argv[1])
    held = json.loads(sys.stdin.readline() or "{}")
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    if ready:
        return 0  # stdin closed: Ray started, or the driver is gone
    print(f"\naser: error: the local Ray instance did not start within {timeout_s:.0f} s (a Ray process may "
          "have died while it started); rerun the same command to resume", file=sys.stderr, flush=True)
    try:
        if held.get("dest") is not None:
            from aser.pipeline import lease

            lease.remove(held["dest"], int(held["epoch"]))
    finally:
        for p in [*descendants(pid), pid]:
            if p != os.getpid():
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
