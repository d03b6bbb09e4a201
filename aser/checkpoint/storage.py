"""Storage I/O by URL: the project's only fsspec user.

URLs: local paths, ``file://``, ``s3://``, ``gs://``, ``az://``, ``memory://`` (tests). Credentials
and endpoints come from each provider's standard chain (for S3: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) or fsspec's own config
(``~/.config/fsspec``, ``FSSPEC_S3_*``) — never from a project flag — and are never logged:
messages name URLs through ``redact``, which drops any ``user:password@`` part.

Writes are atomic: a local file is written under a temporary name in the same directory and
renamed over the target; an object store gets a single PUT, which readers see whole or not at
all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the (redacted) URL."""


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(url: str) -> bool:
    """``scheme://...`` rather than a local path."""
    return bool(_SCHEME.match(url))


def redact(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages and logs."""
    if not _SCHEME.match(url):
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


class ShortRead(StorageError):
    """A range read returned fewer bytes than asked for."""

    def __init__(self, message: str, got: int) -> None:
        super().__init__(message)
        self.got = got


class CredentialsInURL(ValueError):
    """A URL carrying a password: refused before anything could record or print it."""


def resolve(url: str) -> tuple[AbstractFileSystem, str]:
    """(file system, path within it) for a URL or local path.

    A URL with a ``user:password@`` part is refused: s3fs, gcsfs and adlfs do not read
    credentials from it (they would take it for the bucket's name and echo it in their errors),
    and a URL is what Ray's job list, shell histories and schedulers record."""
    if _SCHEME.match(url) and ":" in urlsplit(url).netloc.rpartition("@")[0]:
        raise CredentialsInURL(
            f"{redact(url)}: credentials in the URL are not accepted (they end up in job lists and "
            "logs); give them through the provider's standard chain, e.g. AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or a profile"
        )
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"cannot open {redact(url)}: {e} (install the protocol's fsspec package, "
            "e.g. `pip install aser[s3]`)"
        ) from e
    return fs, path


def join(url: str, *parts: str) -> str:
    """``url`` / part / part, with exactly one slash between components."""
    out = url.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def exists(url: str) -> bool:
    fs, path = resolve(url)
    return bool(fs.exists(path))


def size_bytes(url: str) -> int:
    fs, path = resolve(url)
    try:
        return int(fs.size(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)} does not exist") from e


# What an object store's metadata says about an object's content version, under the names each
# fsspec implementation gives them (s3fs: ETag/VersionId; gcsfs: etag/generation; adlfs:
# etag/version_id), recorded under the lower-case name.
_VERSION_KEYS = {"ETag": "etag", "etag": "etag", "VersionId": "version_id", "version_id": "version_id",
                 "generation": "generation"}


def stat(url: str) -> tuple[int, dict[str, str]]:
    """(size, version) of the object in one metadata request. The version is what the store says
    changes when the content is replaced (the ETag, a version id or generation; for a local file
    its inode and modification time: a file replaced by another has a new inode, one rewritten
    in place a new mtime unless within the filesystem's timestamp tick, a few ms); {} where the
    store says nothing (``memory://``, plain HTTP)."""
    fs, path = resolve(url)
    try:
        if _is_local(fs):
            st = os.stat(path)
            return st.st_size, {"inode": str(st.st_ino), "mtime_ns": str(st.st_mtime_ns)}
        info = fs.info(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)} does not exist") from e
    version = {_VERSION_KEYS[k]: str(v).strip('"') for k, v in info.items() if k in _VERSION_KEYS and v}
    return int(info["size"]), version


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under ``url``, sorted; [] if it is absent."""
    fs, path = resolve(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    names.discard("")
    return sorted(names)


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object (the whole object when both are None).

    Object stores are asked for the range only (an HTTP Range request), so reading one tensor
    out of a 5 GB shard moves that tensor's bytes, not the shard's.
    """
    fs, path = resolve(url)
    try:
        if start is None and end is None:
            return bytes(fs.cat_file(path))
        data = bytes(fs.cat_file(path, start=start, end=end))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)} does not exist") from e
    if start is not None and end is not None and len(data) != end - start:
        # A body cut short under a Content-Length that says the same (a proxy, a broken
        # server): never handed on as if it were the range.
        raise ShortRead(f"{redact(url)}: asked for bytes [{start}, {end}), got {len(data)}; "
                        "the object changed or the store returned a short body", len(data))
    return data


# Bytes per read when hashing an object: one buffer of this size at a time, whatever its size.
DIGEST_CHUNK = 8 << 20


def sha256_and_size(url: str) -> tuple[str, int]:
    """sha256 (hex) and size of the object, read once in ``DIGEST_CHUNK`` pieces (a 5 GB shard
    never sits in memory whole)."""
    fs, path = resolve(url)
    h = hashlib.sha256()
    size = 0
    try:
        with fs.open(path, "rb", block_size=DIGEST_CHUNK) as f:
            while chunk := f.read(DIGEST_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(url)} does not exist") from e
    return h.hexdigest(), size


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def _publish_local(path: str, data: bytes, publish: Callable[[str, str], None]) -> None:
    """Write ``data`` whole (fsynced) under a temporary name beside ``path``, then ``publish``
    it there (``os.replace``: overwrite; ``os.link``: only if absent); the temporary name is
    removed whatever happens."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[BinaryIO]:
    """A file to write ``url`` through, published whole when the block ends without an error
    and not at all otherwise, holding none of it in memory: a local path is written under a
    temporary name beside it (fsynced) and renamed; an object-store URL is written to a local
    temporary file and uploaded in one (multipart) upload, which readers see whole or not at all."""
    fs, path = resolve(url)
    local = _is_local(fs)
    if local:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    else:
        fd, tmp = tempfile.mkstemp(prefix="aser-upload-")
        os.close(fd)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
            fs.invalidate_cache(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old object, or the new one whole, never a part."""
    fs, path = resolve(url)
    if _is_local(fs):
        _publish_local(path, data, os.replace)
        return
    # One PUT (or one completed multipart upload for large data): all or nothing for readers.
    fs.pipe_file(path, data)
    # Object-store file systems cache listings; a later exists()/ls() must see this write.
    fs.invalidate_cache(path)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there; True if this call created it, False
    if the object already existed. Atomic where the store has a conditional write: a local file
    is written under a temporary name and hard-linked to the target (``link`` fails if the
    target exists); S3 and S3-compatible stores get a PUT with ``If-None-Match: *`` (s3fs's
    ``mode="create"``), which the store refuses with 412 if the key exists. Other fsspec
    stores get their implementation's ``mode="create"``, exclusive only if theirs is."""
    fs, path = resolve(url)
    if _is_local(fs):
        try:
            _publish_local(path, data, os.link)
        except FileExistsError:
            return False
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    finally:
        fs.invalidate_cache(path)
    return True


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or a tree with ``recursive``); absent is not an error."""
    fs, path = resolve(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def copy_small(src_url: str, dst_url: str) -> None:
    """Copy a small file (tokenizer, generation_config.json) between any two stores."""
    write_bytes_atomic(dst_url, read_bytes(src_url))
