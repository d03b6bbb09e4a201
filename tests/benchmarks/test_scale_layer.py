"""benchmarks/scale_layer.py compares each process's measured peak RSS with the memory model's
prediction for the phases of the roles it ran: a writer that only copied the embedding is
priced by the copy phase, not by a layer's write (the 70B-sized run's copy-only process used
0.5 GiB where its kind's peak, a layer's read, is 5.3)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scale_layer  # noqa: E402

GiB = 2**30
PLAN = {
    "driver": {"peak_host_bytes": 1 * GiB, "private_host_bytes": 1 * GiB, "phases": {"run": 1 * GiB}},
    "writer": {"peak_host_bytes": 5 * GiB, "private_host_bytes": 4 * GiB,
               "phases": {"write": 3 * GiB, "copy": GiB // 2, "read_layer": 5 * GiB, "return_layer": 4 * GiB}},
    "reconstruct": {"peak_host_bytes": 6 * GiB, "private_host_bytes": 6 * GiB, "phases": {"reconstruct": 6 * GiB}},
}


def _rows(*roles: str) -> list[dict]:
    processes = [{"pid": i, "role": r, "peak_rss_bytes": GiB} for i, r in enumerate(roles)]
    return scale_layer.predicted_vs_measured({"plan": PLAN, "processes": processes})


def test_each_process_is_predicted_by_the_phases_it_ran() -> None:
    rows = _rows("copy", "write", "copy+write", "read+write", "reconstruct+write", "driver")
    assert [r["predicted_rss_bytes"] for r in rows] == [GiB // 2, 3 * GiB, 3 * GiB, 5 * GiB, 6 * GiB, GiB]
    assert rows[0]["ratio_rss"] == 2.0
    # The private bytes are what Ray is asked to reserve: the kind's, whatever the phase.
    assert rows[0]["predicted_private_bytes"] == 4 * GiB


def test_a_plan_without_phases_falls_back_to_the_kinds_peak() -> None:
    plan = {"writer": {"peak_host_bytes": 5 * GiB, "private_host_bytes": 4 * GiB}}
    rows = scale_layer.predicted_vs_measured({"plan": plan, "processes": [{"pid": 1, "role": "copy", "peak_rss_bytes": GiB}]})
    assert rows[0]["predicted_rss_bytes"] == 5 * GiB
