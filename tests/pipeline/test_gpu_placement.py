"""GPU placement on a cluster whose nodes advertise GPUs: the defaults come from the cluster's
resources, actors and reconstruction tasks land on the GPU nodes with the GPUs the plan gave
them, and on machines where torch has no CUDA the same run computes on the CPU, byte-identical
to a run that asked for no GPU at all.

The cluster is separate from the session's (``ray.cluster_utils.Cluster``, not connected to this
process): a head without GPUs and two nodes with one (fake) GPU each; the driver runs as a
subprocess, as ``aser quantize --address`` does on a real cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_run_helpers import SEQ_LEN, output_files

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[tuple[str, set[str], str]]:
    """(GCS address, ids of the GPU nodes, id of the head) of a 3-node cluster with 2 GPUs."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        gpu_nodes = {cluster.add_node(num_cpus=2, num_gpus=1).node_id for _ in range(2)}
        cluster.wait_for_nodes()
        yield str(cluster.address), gpu_nodes, cluster.head_node.node_id
    finally:
        cluster.shutdown()


def _quantize(source: str, dest: Path, calib: str, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "aser.pipeline.cli", "quantize", source, str(dest), "--calib", calib,
            "--num-samples", "8", "--seq-len", str(SEQ_LEN), "--rank", "8", "--address", address,
            "--cpus-per-worker", "0.5", "--no-progress", "--json", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=800)


# Three whole runs on the fake-GPU cluster (104 s): run by .ci/run with the cluster runs, to keep
# the default run well under 15 minutes; the refusals below stay in the default run.
@pytest.mark.cluster
def test_gpus_placed_as_planned_and_cpu_fallback_is_byte_identical(
    gpu_cluster: tuple[str, set[str], str], data_dir: Path, tmp_path: Path
) -> None:
    address, gpu_nodes, head = gpu_cluster
    source, calib = str(data_dir / "stories260K"), str(data_dir / "tinystories" / "sample.txt")

    auto = _quantize(source, tmp_path / "auto", calib, address)
    assert auto.returncode == 0, auto.stderr[-3000:]
    summary = json.loads(auto.stdout.strip().splitlines()[-1])["summary"]
    # Defaults from the cluster: one worker per GPU, half a GPU each, a quarter per reconstruction.
    assert summary["resources"] == {"num_workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 0.5,
                                    "reconstruct_gpus": 0.25, "cluster_gpus": 2.0,
                                    "reconstruct_cpus": 1}
    workers = summary["workers"]
    assert len(workers) == 2
    for w in workers:
        assert w["node_id"] in gpu_nodes and len(w["gpu_ids"]) == 1, w
        assert w["device"] == "cpu"  # this torch has no CUDA: the fallback, not a failure
    recon = [p for p in summary["processes"] if "reconstruct" in p["role"].split("+")]
    assert recon, summary["processes"]
    for p in recon:
        # A Ray worker process that ran a reconstruction task was given a GPU, on a GPU node.
        assert p["node_id"] in gpu_nodes and p["gpus"], p
    assert all(p["node_id"] != head for p in recon)

    # The same run asking for no GPU: the workers get none, and the bytes are the same.
    cpu = _quantize(source, tmp_path / "cpu", calib, address, "--workers", "2", "--gpus-per-worker", "0",
                    "--reconstruct-gpus", "0")
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    cpu_summary = json.loads(cpu.stdout.strip().splitlines()[-1])["summary"]
    assert all(w["gpu_ids"] == [] for w in cpu_summary["workers"])
    assert output_files(str(tmp_path / "auto")) == output_files(str(tmp_path / "cpu"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--workers", "2", "--gpus-per-worker", "2"],
         "2 calibration worker(s) x 2 GPU need 4 GPUs; the Ray cluster has 2"),
        (["--workers", "2", "--gpus-per-worker", "1"],
         "reconstruction tasks ask for 0.25 GPU each, but the cluster's 2 GPU(s) would be held whole"),
    ],
)
def test_requests_the_cluster_cannot_grant_fail_at_once(
    gpu_cluster: tuple[str, set[str], str], data_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    """Ray would wait forever for resources no node has; the driver says so instead."""
    address = gpu_cluster[0]
    res = _quantize(str(data_dir / "stories260K"), tmp_path / "d", str(data_dir / "tinystories" / "sample.txt"),
                    address, *extra)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
