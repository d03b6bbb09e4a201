"""Safetensors by byte range: read a source's headers, read single tensors, write shards.

A source checkpoint is ``model.safetensors.index.json`` + shards, or one ``model.safetensors``.
Only headers are read up front (the driver holds metadata only); a worker then reads exactly
the byte ranges of the tensors its layer needs, so no shard is ever loaded whole.

File format (safetensors spec): 8-byte little-endian header length n, n bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as _st_save

from aser.checkpoint import storage

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The spec caps the header at 100 MB; anything larger is corruption, not a big model.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Adjacent tensors of one layer are fetched in one request when the gap between them is small.
COALESCE_GAP_BYTES = 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


class SafetensorsError(ValueError):
    """A source checkpoint is missing, truncated or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) of its data in ``file``."""

    name: str
    file: str  # shard file name, relative to the source URL
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ShardHeader:
    file: str
    size_bytes: int
    header_sha256: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    version: dict[str, str] = field(default_factory=dict)  # storage.stat's: ETag, mtime, ...


@dataclass(frozen=True)
class SourceIndex:
    """Metadata of a source checkpoint: every tensor's location, and a cheap fingerprint."""

    url: str
    index_sha256: str | None  # None for a single-file checkpoint
    shards: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.tensors if n.startswith(prefix))

    def fingerprint(self) -> dict[str, object]:
        """Hashes of the index and every header, sizes, and each shard's version as its store
        reports it (``storage.stat``): changes if any tensor moves or is resized or retyped, and
        if a shard is replaced by one with the same layout but other values (another fine-tune of
        the architecture, an in-place re-upload), without reading the tensor data."""
        return {
            "index_sha256": self.index_sha256,
            "shards": {
                name: {"size_bytes": s.size_bytes, "header_sha256": s.header_sha256, "version": s.version}
                for name, s in sorted(self.shards.items())
            },
        }


def read_header(url: str, file: str) -> ShardHeader:
    """Parse the header of one safetensors file at ``url`` (named ``file`` in the index)."""
    shown = storage.redact(url)
    try:
        size, version = storage.stat(url)
    except FileNotFoundError as e:
        raise SafetensorsError(f"shard {shown} is missing") from e
    if size < 8:
        raise SafetensorsError(f"{shown} is truncated: {size} bytes, no header length")
    (n,) = struct.unpack("<Q", storage.read_bytes(url, 0, 8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SafetensorsError(
            f"{shown} has a corrupt or truncated header: header length {n}, file size {size}"
        )
    raw = storage.read_bytes(url, 8, 8 + n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{shown} has a corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{shown} has a corrupt header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{shown} has a corrupt header: __metadata__ is not a JSON object")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{shown}: corrupt header entry for tensor {name}") from e
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int and type(end) is int):
            raise SafetensorsError(f"{shown}: tensor {name} has a malformed shape {shape!r} or data offsets "
                                   f"{entry['data_offsets']!r} (corrupt header)")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{shown}: tensor {name} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise SafetensorsError(
                f"{shown}: tensor {name} ({dtype} {shape}) has data offsets [{begin}, {end}) "
                f"inconsistent with its size or the file size {size} (truncated file?)"
            )
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), data_start + begin, data_start + end)
    _check_layout(shown, tensors, data_start, size)
    return ShardHeader(file, size, hashlib.sha256(raw).hexdigest(), tensors, dict(metadata), version)


def _check_layout(shown: str, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The data section as the reference library requires it (``safetensors``' metadata
    validation): the tensors, in offset order, tile it exactly — no overlap, no gap, nothing
    after the last. A header that lies about where a tensor is cannot be read past."""
    pos = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else f"leaves a gap of {info.start - pos} bytes"
            raise SafetensorsError(f"{shown}: tensor {info.name}'s data offsets {what} (corrupt header)")
        pos = info.end
    if pos != size:
        raise SafetensorsError(f"{shown}: {size - pos} bytes after the last tensor's data (corrupt header or file)")


def open_source(url: str) -> SourceIndex:
    """Read the index (or the single file's header) and every shard header of a checkpoint."""
    shown = storage.redact(url)
    index_url = storage.join(url, INDEX_NAME)
    if storage.exists(index_url):
        raw = storage.read_bytes(index_url)
        try:
            weight_map = json.loads(raw)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{storage.redact(index_url)} is not a valid index: {e}") from e
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v and "/" not in v and v != ".."
                                                     for v in weight_map.values())):
            raise SafetensorsError(f"{storage.redact(index_url)} is not a valid index: weight_map must map "
                                   "tensor names to shard file names")
        index_sha: str | None = hashlib.sha256(raw).hexdigest()
    elif storage.exists(storage.join(url, SINGLE_NAME)):
        weight_map, index_sha = None, None
    else:
        raise SafetensorsError(f"{shown} has neither {INDEX_NAME} nor {SINGLE_NAME}")

    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    shards = {f: read_header(storage.join(url, f), f) for f in files}
    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        tensors = dict(shards[SINGLE_NAME].tensors)
    else:
        for name, file in sorted(weight_map.items()):
            info = shards[file].tensors.get(name)
            if info is None:
                raise SafetensorsError(
                    f"tensor {name} is listed in {INDEX_NAME} under {file} but missing from that shard"
                )
            tensors[name] = info
    return SourceIndex(url, index_sha, shards, tensors)


def open_file(url: str) -> SourceIndex:
    """A SourceIndex over one safetensors file (e.g. a shard this run wrote)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    header = read_header(url, name)
    return SourceIndex(parent, None, {name: header}, dict(header.tensors))


def _decode(info: TensorInfo, data: bytes | bytearray | memoryview) -> torch.Tensor:
    dtype = DTYPES[info.dtype]
    if len(data) == 0:
        return torch.empty(info.shape, dtype=dtype)
    # frombuffer shares memory with a writable buffer; the bytearray copy is what we keep.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)


# Elements per block of the finiteness check: its float32 copy and mask stay this small (a whole
# Llama-3-70B gate_proj checked at once was a 0.9 GiB copy and a 0.2 GiB mask).
FINITE_CHECK_BLOCK = 1 << 22


def _check_finite(info: TensorInfo, t: torch.Tensor, url: str) -> None:
    if not t.is_floating_point() or not t.numel():
        return
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), FINITE_CHECK_BLOCK):
        block = flat[i : i + FINITE_CHECK_BLOCK].float()  # every float dtype, float8 included
        if not bool(torch.isfinite(block).all()):
            bad = "NaN" if bool(torch.isnan(block).any()) else "Inf"
            raise SafetensorsError(f"tensor {info.name} in {storage.redact(url)} contains {bad} values")


def read_tensors(
    source: SourceIndex, names: Iterable[str], digests: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Read the named tensors by byte range, coalescing neighbours in the same shard.

    digests: filled with each tensor's sha256 (hex) of the bytes read, when given.
    Raises SafetensorsError naming a tensor that is not in the source, or whose data is NaN/Inf.
    """
    wanted = sorted(set(names))
    missing = [n for n in wanted if n not in source.tensors]
    if missing:
        raise SafetensorsError(
            f"tensor {missing[0]} is not in {storage.redact(source.url)}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    by_file: dict[str, list[TensorInfo]] = {}
    for n in wanted:
        info = source.tensors[n]
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, torch.Tensor] = {}
    for file, infos in sorted(by_file.items()):
        url = storage.join(source.url, file)
        infos.sort(key=lambda i: i.start)
        runs: list[list[TensorInfo]] = [[infos[0]]]
        for info in infos[1:]:
            if info.start - runs[-1][-1].end <= COALESCE_GAP_BYTES:
                runs[-1].append(info)
            else:
                runs.append([info])
        for run in runs:
            lo, hi = run[0].start, max(i.end for i in run)
            try:
                blob = memoryview(storage.read_bytes(url, lo, hi))
            except FileNotFoundError as e:
                raise SafetensorsError(f"shard {storage.redact(url)} is missing") from e
            except storage.ShortRead as e:
                raise SafetensorsError(
                    f"shard {storage.redact(url)} is truncated: reading {run[0].name} got "
                    f"{e.got} of {hi - lo} bytes"
                ) from e
            for info in run:
                raw = blob[info.start - lo : info.end - lo]
                if digests is not None:
                    digests[info.name] = hashlib.sha256(raw).hexdigest()
                t = _decode(info, raw)
                _check_finite(info, t, url)
                out[info.name] = t
    return out


class SourceChanged(SafetensorsError):
    """Bytes read from the source differ from those an earlier invocation of the run read."""


def check_content(what: str, recorded: str | None, got: str) -> None:
    """Raise SourceChanged if ``got`` (``content_sha256`` of bytes just read) differs from the
    hash ``recorded`` when the run first read them (None: not read before)."""
    if recorded is not None and recorded != got:
        raise SourceChanged(
            f"the source's bytes of {what} changed since this destination was started (content "
            f"sha256 {recorded[:16]} -> {got[:16]}) although its store reports the same versions "
            "and headers; use a new destination or restore the source"
        )


def content_sha256(digests: Mapping[str, str], prefix: str = "") -> str:
    """One hash of named tensors' bytes (``read_tensors``' digests), independent of how they
    are laid out in shards: the sha256 of "name<TAB>sha256" lines in name order, names with
    ``prefix`` removed."""
    lines = "".join(f"{n[len(prefix):] if n.startswith(prefix) else n}\t{d}\n" for n, d in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# The only metadata written: the library keeps ``__metadata__`` in a hash map, whose order (and
# so the bytes) changes from run to run once it holds more than one key.
SHARD_METADATA = {"format": "pt"}


def shard_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize deterministically: sorted names, contiguous CPU tensors, fixed metadata."""
    ordered = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    return _st_save(ordered, metadata=SHARD_METADATA)


def shard_layout(
    specs: Mapping[str, tuple[str, Sequence[int]]],
) -> tuple[bytes, list[str]]:
    """What ``shard_bytes`` would write before the data, for tensors of these dtypes (safetensors
    names: "BF16", ...) and shapes: (the 8-byte length and the header, padded to 8 bytes as the
    library pads it; the names in the order their data follows). The order is the library's own
    (dtype, then name), asked of it with one-element stand-ins, so no rule of it is copied here."""
    stand_ins = {n: torch.zeros(1, dtype=DTYPES[d]) for n, (d, _) in specs.items()}
    raw = _st_save(stand_ins, metadata=SHARD_METADATA)
    (n,) = struct.unpack("<Q", raw[:8])
    order = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    header: dict[str, object] = {"__metadata__": SHARD_METADATA}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_shard_streaming(
    url: str,
    specs: Mapping[str, tuple[str, Sequence[int]]],
    tensor: Callable[[str], torch.Tensor],
) -> tuple[str, int]:
    """``write_shard`` of tensors that need not all be in memory: ``tensor(name)`` is asked for
    each in the order its data goes in the file and may be dropped once written, so this holds
    one tensor at a time (``specs``: name -> (dtype, shape), as ``shard_layout`` takes). The
    bytes are ``shard_bytes``'s for the same tensors. Returns (sha256 hex, size in bytes)."""
    head, order = shard_layout(specs)
    h = hashlib.sha256(head)
    size = len(head)
    with storage.atomic_writer(url) as f:
        f.write(head)
        for name in order:
            t = tensor(name)
            dtype, shape = specs[name]
            if t.dtype != DTYPES[dtype] or tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor {name}: {t.dtype} {tuple(t.shape)}, the layout says {dtype} {tuple(shape)}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            h.update(data)
            size += data.nbytes
            del t, data  # before the next is asked for
    return h.hexdigest(), size


def write_shard(
    url: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[str, int]:
    """Write a shard atomically; returns (sha256 hex, size in bytes) of what was written."""
    data = shard_bytes(tensors)
    storage.write_bytes_atomic(url, data)
    return hashlib.sha256(data).hexdigest(), len(data)
