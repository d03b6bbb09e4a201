"""Peak private memory (RssAnon) of a process and its Ray workers, sampled from /proc.

``ru_maxrss`` (what the manifest records per process) counts the object store's shared pages a
worker has touched, which accumulate over a run without any leak; the private pages are what a
process itself holds. Used by the depth-leak test and by ``benchmarks/scale_layer.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SAMPLE_INTERVAL_S = 0.01
TREE_INTERVAL_S = 0.5
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def python_descendants(pid: int) -> list[int]:
    """``pid`` and the Ray worker processes under it (not Ray's daemons: raylet, GCS, agents)."""
    out, stack = [pid], [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::"):  # a worker (its title: ray::IDLE, ray::smooth_task ...)
                    out.append(p)
        except OSError:
            continue
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def rss_anon_bytes(pid: int) -> int:
    """Resident pages not backed by a file or shared memory (statm: resident - shared), i.e.
    ``RssAnon``; statm is the cheapest of /proc's memory files, so the sampler can run often."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
    except OSError:
        return 0  # the process has exited
    return (int(fields[1]) - int(fields[2])) * PAGE_BYTES


@contextmanager
def sample_rss_anon(root_pid: int) -> Iterator[dict[int, int]]:
    """Peak RssAnon of ``root_pid`` and its descendants, sampled until the block ends.

    A task worker's peak lasts ~0.1 s (a layer's tensors next to their serialised copies): the
    known processes are sampled every few ms, and the process tree (a walk over every thread of
    Ray's daemons) is read again only every ``TREE_INTERVAL_S``."""
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        pids, next_tree = [root_pid], 0.0
        while not done.is_set():
            if time.monotonic() >= next_tree:
                pids, next_tree = python_descendants(root_pid), time.monotonic() + TREE_INTERVAL_S
            for pid in pids:
                peaks[pid] = max(peaks.get(pid, 0), rss_anon_bytes(pid))
            done.wait(SAMPLE_INTERVAL_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()
