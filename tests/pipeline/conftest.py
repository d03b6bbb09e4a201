"""Fixtures for pipeline tests: a 3-node Ray cluster on loopback (S3 fixtures: tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
