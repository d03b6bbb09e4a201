"""Storage I/O through a fault-injecting proxy in front of the S3 endpoint (tests/fault_proxy.py):
errors, resets, stalls and truncated bodies are retried by s3fs/botocore and the bytes come back
right; a body cut short under a matching Content-Length (nothing in HTTP tells) is an error
naming the object, never a short tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from aser.checkpoint import storage
from fault_proxy import FaultProxy, Faults


@pytest.fixture
def through_proxy(s3_bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    """S3 calls go through a FaultProxy whose Faults the test sets (none at first)."""
    import s3fs

    faults = Faults(rates={})
    with FaultProxy(moto_endpoint, faults) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield faults
    s3fs.S3FileSystem.clear_instance_cache()


def _set(faults: Faults, rates: dict[str, float], seed: int) -> None:
    new = Faults(rates=rates, seed=seed, stall_s=0.2)
    faults.rates, faults._rng, faults.stall_s = new.rates, new._rng, new.stall_s


def test_retryable_faults_are_retried_and_bytes_come_back_right(s3_bucket: str, through_proxy: Faults) -> None:
    data = os.urandom(1 << 16)
    url = storage.join(s3_bucket, "faults", "blob.bin")
    _set(through_proxy, {"error": 0.15, "reset": 0.1, "stall": 0.1, "truncate": 0.1}, seed=1)
    for i in range(10):
        storage.write_bytes_atomic(url, data)
        assert storage.stat(url)[0] == len(data)
        assert storage.read_bytes(url) == data
        lo = 97 * i
        assert storage.read_bytes(url, lo, lo + 4099) == data[lo : lo + 4099]
        assert storage.sha256_and_size(url)[1] == len(data)
    counts = through_proxy.counts
    assert all(counts[k] > 0 for k in ("error", "reset", "stall", "truncate")), counts


def test_a_short_body_under_a_matching_length_is_an_error_naming_the_object(s3_bucket: str, through_proxy: Faults) -> None:
    url = storage.join(s3_bucket, "faults", "short.bin")
    storage.write_bytes_atomic(url, bytes(range(256)) * 16)
    _set(through_proxy, {"short": 1.0}, seed=0)
    with pytest.raises(storage.StorageError, match=r"short\.bin: asked for bytes \[100, 2148\), got 1024"):
        storage.read_bytes(url, 100, 2148)
