"""Fixtures for pipeline tests: a 3-node Ray cluster on loopback (S3 fixtures: tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster(moto_endpoint: str) -> Iterator[str]:
    """A 3-node Ray cluster on 127.0.0.1 (ray.cluster_utils.Cluster), this process connected.

    Logical CPUs are oversubscribed on purpose (the machine has few cores): calibration actors
    hold theirs for a whole run, and the tasks need the rest. Yields the GCS address for
    subprocess drivers (``aser quantize --address``).
    """
    import ray
    from ray.cluster_utils import Cluster

    # Ray's processes inherit the environment they are started with: the standard AWS variables
    # (the same values ``s3_bucket`` sets) let its workers reach the loopback S3 server.
    for var, value in (("AWS_ENDPOINT_URL", moto_endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                       ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[var] = value
    node = {"num_cpus": 3, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(2):
        cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    try:
        yield str(cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def reference(moto_endpoint: str, stories_dir: Path, data_dir: Path) -> Iterator[tuple[Any, dict[str, bytes], float]]:
    """The chaos harness's uninterrupted run (stories260K, S3 to S3, a subprocess with its own
    Ray): its setup, files and wall time; what test_chaos and test_lease_runs compare against."""
    import s3fs
    from chaos_harness import RUN_TIMEOUT_S, Setup, dest_files, finish, start, upload

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("aser-chaos")
    upload(stories_dir, "s3://aser-chaos/src")
    setup = Setup(moto_endpoint, "s3://aser-chaos/src", str(data_dir / "tinystories" / "sample.txt"),
                  env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    run = start(setup, "s3://aser-chaos/ref")
    rc, wall = finish(run, RUN_TIMEOUT_S)
    assert rc == 0, run.stderr()[-3000:]
    yield setup, dest_files("s3://aser-chaos/ref"), wall
    mp.undo()
    s3fs.S3FileSystem.clear_instance_cache()
