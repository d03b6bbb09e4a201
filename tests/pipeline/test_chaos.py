"""The chaos harness, reduced (benchmarks/chaos.py runs it at length): `aser quantize` from S3 to
S3 as a subprocess with its own Ray, killed with its whole machine at a seeded random moment and
rerun; then a run whose S3 traffic goes through a fault-injecting proxy. Both end byte-identical
to an uninterrupted run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from aser.checkpoint import storage
from chaos_harness import RUN_TIMEOUT_S, Setup, dest_files, driver_kill, node_loss, storage_faults
from fault_proxy import FaultProxy, Faults

# Real multi-process runs at random moments (~2.5 min): run by .ci/run with ``-m cluster``.
pytestmark = [pytest.mark.timeout(900), pytest.mark.cluster]
SEED = 42  # draws a kill at 0.64 of the run: inside the layer loop (benchmarks/chaos.py draws many)
NODE_LOSS_AFTER_STAGES = 2  # of stories260K's 7 (embedding copy, 5 layers, head copy)


def test_driver_killed_at_a_random_moment_reruns_to_the_same_bytes(reference: tuple[Setup, dict[str, bytes], float]) -> None:
    setup, ref, wall = reference
    at = random.Random(SEED).uniform(0.0, wall)
    print(f"seed {SEED}: kill at {at:.1f} s of a {wall:.1f} s run")
    trial = driver_kill(setup, "s3://aser-chaos/killed", at, RUN_TIMEOUT_S)
    assert trial["completed"], trial
    assert dest_files("s3://aser-chaos/killed") == ref


def test_storage_faults_are_retried_to_the_same_bytes(reference: tuple[Setup, dict[str, bytes], float],
                                                      moto_endpoint: str) -> None:
    setup, ref, _ = reference
    faults = Faults(rates={"error": 0.03, "reset": 0.02, "stall": 0.02, "truncate": 0.02}, seed=SEED, stall_s=0.3)
    with FaultProxy(moto_endpoint, faults) as proxy:
        trial = storage_faults(setup, "s3://aser-chaos/faults", proxy, RUN_TIMEOUT_S)
    print(f"seed {SEED}: {dict(faults.counts)}")
    assert trial["completed"], trial
    assert trial["first_run"]["rc"] == 0, trial  # retried by s3fs/botocore, not by a rerun
    assert all(faults.counts[k] > 0 for k in ("error", "reset", "stall", "truncate")), faults.counts
    assert dest_files("s3://aser-chaos/faults") == ref
    assert storage.exists("s3://aser-chaos/faults/model.safetensors.index.json")


def test_node_removed_mid_run_completes_or_resumes_to_the_same_bytes(
        reference: tuple[Setup, dict[str, bytes], float]) -> None:
    """A worker node of a 3-node cluster, the one holding a calibration actor, removed mid-run
    (tests/pipeline/node_loss_run.py): the run completes on the node left, or stops with a clear
    error and a rerun completes."""
    setup, ref, _ = reference
    dest = "s3://aser-chaos/node-loss"
    trial = node_loss(setup, dest, NODE_LOSS_AFTER_STAGES, RUN_TIMEOUT_S)
    print(f"node removed after {NODE_LOSS_AFTER_STAGES} stages: {trial}")
    first = trial["first_run"]
    assert first["removed_at_s"] < first["wall_s"] and first["removed_node_had_a_calibration_actor"], trial
    assert first["status"] == "complete" or first["error"], trial  # recovered, or a clear error
    assert trial["completed"], trial
    assert dest_files(dest) == ref
