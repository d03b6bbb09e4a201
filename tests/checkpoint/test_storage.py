from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from aser.checkpoint import storage


def _roundtrip(base: str, versioned: bool = True) -> None:
    url = storage.join(base, "dir", "blob.bin")
    assert not storage.exists(url)
    data = bytes(range(256)) * 4
    storage.write_bytes_atomic(url, data)
    assert storage.exists(url)
    assert storage.size_bytes(url) == len(data)
    size, version = storage.stat(url)
    assert size == len(data) and bool(version) == versioned
    # Replaced in place by other bytes of the same size: the store's version says so.
    storage.write_bytes_atomic(url, data[::-1])
    size2, version2 = storage.stat(url)
    assert size2 == size and (version2 != version if versioned else version2 == {})
    storage.write_bytes_atomic(url, data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 10, 20) == data[10:20]
    assert storage.read_bytes(url, 1000, 1024) == data[1000:1024]
    assert storage.sha256_and_size(url) == (hashlib.sha256(data).hexdigest(), len(data))
    storage.write_bytes_atomic(url, b"new")  # overwrite replaces whole
    assert storage.read_bytes(url) == b"new"
    storage.write_text_atomic(storage.join(base, "dir", "a.json"), "{}")
    assert storage.list_dir(storage.join(base, "dir")) == ["a.json", "blob.bin"]
    storage.copy_small(url, storage.join(base, "copy", "blob.bin"))
    assert storage.read_bytes(storage.join(base, "copy", "blob.bin")) == b"new"
    storage.remove(storage.join(base, "dir"), recursive=True)
    assert not storage.exists(url)
    assert storage.list_dir(storage.join(base, "dir")) == []
    with pytest.raises(FileNotFoundError, match="blob.bin does not exist"):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError, match="blob.bin does not exist"):
        storage.sha256_and_size(url)
    with pytest.raises(FileNotFoundError, match="blob.bin does not exist"):
        storage.stat(url)


def test_local_path_and_file_url(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "plain"))
    _roundtrip((tmp_path / "url").as_uri())


def test_memory() -> None:
    _roundtrip(f"memory://aser-{uuid.uuid4().hex}", versioned=False)  # the store records no version


def test_cloud_stores_through_their_standard_environment(bucket: str) -> None:
    """S3, GCS and Azure Blob, each through its emulator's real protocol on loopback and its
    fsspec package, reached the way a user reaches the cloud (endpoint and credentials from the
    provider's environment, none in the URL)."""
    _roundtrip(storage.join(bucket, "prefix"))


def test_local_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    storage.write_bytes_atomic(str(target), b"old")

    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(target), 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_redact_drops_credentials() -> None:
    assert storage.redact("s3://KEY:SECRET@bucket/x") == "s3://***@bucket/x"
    assert "SECRET" not in storage.redact("https://u:SECRET@host:9000/p")
    assert storage.redact("/local/path") == "/local/path"
    assert storage.redact("s3://bucket/x") == "s3://bucket/x"


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(storage.StorageError, match="nosuchproto://"):
        storage.exists("nosuchproto://x/y")


def test_digest_reads_in_chunks_and_covers_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of 3.5 chunks: every chunk and the short tail go into the hash and the size."""
    monkeypatch.setattr(storage, "DIGEST_CHUNK", 1000)
    data = os.urandom(3500)
    url = str(tmp_path / "blob.bin")
    storage.write_bytes_atomic(url, data)
    assert storage.sha256_and_size(url) == (hashlib.sha256(data).hexdigest(), 3500)
