from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aser.checkpoint import safetensors_io as sio
from aser.checkpoint import storage


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.a.weight": torch.randn(7, 5, generator=g),
        "model.layers.0.b.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "model.layers.1.a.weight": torch.randn(4, 4, generator=g).half(),
        "model.layers.1.codes": torch.randint(-8, 8, (6, 2), generator=g, dtype=torch.int8),
        "model.embed_tokens.weight": torch.randn(11, 5, generator=g),
    }


def _write_sharded(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(root / file))
        weight_map.update({k: file for k in keys})
    (root / sio.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_range_reads_match(tmp_path: Path) -> None:
    t = _tensors()
    _write_sharded(tmp_path / "m", t)
    src = sio.open_source(str(tmp_path / "m"))
    assert set(src.tensors) == set(t)
    names = src.names_with_prefix("model.layers.1.")
    assert names == ["model.layers.1.a.weight", "model.layers.1.codes"]
    got = sio.read_tensors(src, names + ["model.layers.0.b.weight"])
    for n, v in got.items():
        assert v.dtype == t[n].dtype and torch.equal(v, t[n]), n


def test_single_file_in_memory_fs() -> None:
    t = _tensors()
    base = f"memory://aser-{uuid.uuid4().hex}"
    storage.write_bytes_atomic(storage.join(base, sio.SINGLE_NAME), sio.shard_bytes(t))
    src = sio.open_source(base)
    assert src.index_sha256 is None
    got = sio.read_tensors(src, t)
    assert all(torch.equal(got[n], t[n]) for n in t)


def _spy_range_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, int | None]]:
    """Record the (start, end) of every storage read from now on."""
    calls: list[tuple[int | None, int | None]] = []
    real = storage.read_bytes

    def spy(url: str, start: int | None = None, end: int | None = None) -> bytes:
        calls.append((start, end))
        return real(url, start, end)

    monkeypatch.setattr(storage, "read_bytes", spy)
    return calls


def test_reads_only_the_needed_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = {"big": torch.zeros(1 << 20), "small": torch.ones(3)}  # 4 MiB + 12 B
    save_file(t, str(tmp_path / sio.SINGLE_NAME))
    src = sio.open_source(str(tmp_path))
    calls = _spy_range_reads(monkeypatch)
    assert torch.equal(sio.read_tensors(src, ["small"])["small"], t["small"])
    assert len(calls) == 1 and calls[0][1] - calls[0][0] == 12  # type: ignore[operator]


def test_fingerprint_changes_with_header_not_equal_data(tmp_path: Path) -> None:
    t = _tensors()
    _write_sharded(tmp_path / "a", t)
    fp = sio.open_source(str(tmp_path / "a")).fingerprint()
    assert fp == sio.open_source(str(tmp_path / "a")).fingerprint()
    t2 = dict(t)
    t2["model.layers.0.a.weight"] = torch.randn(7, 6)
    _write_sharded(tmp_path / "b", t2)
    assert sio.open_source(str(tmp_path / "b")).fingerprint() != fp


def test_fingerprint_changes_when_a_shard_is_replaced_by_one_of_the_same_layout(tmp_path: Path) -> None:
    # Another fine-tune of the same architecture copied over the source: index, headers and
    # sizes all equal; only the store's version of the shard (here its mtime) tells.
    t = _tensors()
    _write_sharded(tmp_path, t)
    before = sio.open_source(str(tmp_path))
    t["model.layers.0.a.weight"] = t["model.layers.0.a.weight"] + 1
    # Rewritten in place (same inode): only the mtime tells, so the rewrite must come after the
    # filesystem's timestamp tick (a few ms; a real copy of a model takes longer).
    time.sleep(0.05)
    _write_sharded(tmp_path, t)
    after = sio.open_source(str(tmp_path))
    changed = [n for n in before.shards if before.shards[n].version != after.shards[n].version]
    assert changed and all(before.shards[n].header_sha256 == after.shards[n].header_sha256 for n in before.shards)
    assert before.fingerprint() != after.fingerprint()


def test_missing_shard_is_named(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(sio.SafetensorsError, match="model-00002-of-00002.safetensors is missing"):
        sio.open_source(str(tmp_path))


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    with pytest.raises(sio.SafetensorsError, match="neither"):
        sio.open_source(str(tmp_path))


def test_truncated_and_corrupt_headers(tmp_path: Path) -> None:
    f = tmp_path / sio.SINGLE_NAME
    save_file({"x": torch.ones(100)}, str(f))
    raw = f.read_bytes()
    f.write_bytes(raw[:-10])  # data cut short
    with pytest.raises(sio.SafetensorsError, match="tensor x .*truncated"):
        sio.open_source(str(tmp_path))
    f.write_bytes(raw[:20])  # header cut short
    with pytest.raises(sio.SafetensorsError, match="corrupt or truncated header"):
        sio.open_source(str(tmp_path))
    f.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(sio.SafetensorsError, match="corrupt header"):
        sio.open_source(str(tmp_path))
    f.write_bytes(b"abc")
    with pytest.raises(sio.SafetensorsError, match="truncated"):
        sio.open_source(str(tmp_path))


def test_tensor_missing_from_shard_or_source_is_named(tmp_path: Path) -> None:
    t = _tensors()
    _write_sharded(tmp_path, t)
    index = json.loads((tmp_path / sio.INDEX_NAME).read_text())
    index["weight_map"]["model.layers.9.ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / sio.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(sio.SafetensorsError, match="model.layers.9.ghost .*missing from that shard"):
        sio.open_source(str(tmp_path))
    del index["weight_map"]["model.layers.9.ghost"]
    (tmp_path / sio.INDEX_NAME).write_text(json.dumps(index))
    src = sio.open_source(str(tmp_path))
    with pytest.raises(sio.SafetensorsError, match="tensor model.layers.7.x is not in"):
        sio.read_tensors(src, ["model.layers.7.x"])


def test_nan_weight_is_named(tmp_path: Path) -> None:
    w = torch.ones(4, 4)
    w[2, 1] = float("nan")
    save_file({"model.layers.0.mlp.up_proj.weight": w, "ok": torch.ones(2)}, str(tmp_path / sio.SINGLE_NAME))
    src = sio.open_source(str(tmp_path))
    assert torch.equal(sio.read_tensors(src, ["ok"])["ok"], torch.ones(2))
    with pytest.raises(sio.SafetensorsError,
                       match=rf"^tensor model.layers.0.mlp.up_proj.weight in {tmp_path}/{sio.SINGLE_NAME} contains NaN values$"):
        sio.read_tensors(src, ["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_finiteness_check_goes_by_blocks_and_sees_the_last(tmp_path: Path, monkeypatch, dtype) -> None:
    """Blocks of a few elements: an Inf in the last, partial block is still found (and a clean
    tensor of several blocks passes)."""
    monkeypatch.setattr(sio, "FINITE_CHECK_BLOCK", 4)
    w = torch.ones(3, 5, dtype=dtype)
    w[2, 4] = float("inf")
    save_file({"bad": w, "ok": torch.ones(3, 5, dtype=dtype)}, str(tmp_path / sio.SINGLE_NAME))
    src = sio.open_source(str(tmp_path))
    assert torch.equal(sio.read_tensors(src, ["ok"])["ok"], torch.ones(3, 5, dtype=dtype))
    with pytest.raises(sio.SafetensorsError, match=r"^tensor bad in .* contains Inf values$"):
        sio.read_tensors(src, ["bad"])


def test_write_shard_is_deterministic_and_readable(tmp_path: Path) -> None:
    t = _tensors()
    shuffled = dict(reversed(list(t.items())))
    assert sio.shard_bytes(t) == sio.shard_bytes(shuffled)
    sha, size = sio.write_shard(str(tmp_path / sio.SINGLE_NAME), shuffled)
    data = (tmp_path / sio.SINGLE_NAME).read_bytes()
    assert size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    src = sio.open_source(str(tmp_path))
    assert src.shards[sio.SINGLE_NAME].metadata == {"format": "pt"}
    got = sio.read_tensors(src, t)
    assert all(torch.equal(got[n], t[n]) for n in t)


def test_fingerprint_is_the_index_hash_and_each_header_hash(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    shards = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        shards[f.name] = {"size_bytes": len(raw), "header_sha256": hashlib.sha256(raw[8 : 8 + n]).hexdigest(),
                          "version": {"inode": str(f.stat().st_ino), "mtime_ns": str(f.stat().st_mtime_ns)}}
    index_sha = hashlib.sha256((tmp_path / sio.INDEX_NAME).read_bytes()).hexdigest()
    assert sio.open_source(str(tmp_path)).fingerprint() == {"index_sha256": index_sha, "shards": shards}


def test_open_file_reads_one_written_shard(tmp_path: Path) -> None:
    # A trailing slash names the same file; only slashes are stripped (the name ends in X).
    url = str(tmp_path / "shard.X") + "/"
    sio.write_shard(url, {"w": torch.arange(3.0)})
    src = sio.open_file(url)
    assert (src.url, src.index_sha256, list(src.shards), list(src.tensors)) == (str(tmp_path), None, ["shard.X"], ["w"])
    assert src.shards["shard.X"].file == "shard.X"
    assert src.shards["shard.X"].metadata == {"format": "pt"}
    assert torch.equal(sio.read_tensors(src, ["w"])["w"], torch.arange(3.0))


def _raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> str:
    """A hand-made safetensors file: 8-byte header length (``length`` overrides it), JSON, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def _header_error(url: str) -> str:
    with pytest.raises(sio.SafetensorsError) as e:
        sio.read_header(url, "x.safetensors")
    return str(e.value)


def test_header_error_messages_are_exact(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    url = _raw_file(f, [])
    assert _header_error(url) == f"{url} has a corrupt header: not a JSON object"
    _raw_file(f, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    assert _header_error(url) == f"{url}: corrupt header entry for tensor w"
    _raw_file(f, {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    assert _header_error(url) == f"{url}: tensor w has unsupported dtype F4"
    # Offsets inside the file but too short for the shape: 4 bytes for two F32 values.
    _raw_file(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
    assert _header_error(url) == (
        f"{url}: tensor w (F32 [2]) has data offsets [0, 4) inconsistent with its size or the file size "
        f"{f.stat().st_size} (truncated file?)"
    )
    # A header length with the top bit set is huge (unsigned), not negative.
    _raw_file(f, {}, length=2**63 + 5)
    assert _header_error(url) == (
        f"{url} has a corrupt or truncated header: header length {2**63 + 5}, file size {f.stat().st_size}"
    )
    # Exactly 8 bytes holds a header length (0) and an empty header: corrupt, not truncated.
    f.write_bytes(struct.pack("<Q", 0))
    assert _header_error(url).startswith(f"{url} has a corrupt header: Expecting value")


def test_header_length_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header of exactly MAX_HEADER_BYTES is read; one byte more is refused (a smaller limit
    stands in for the spec's 100 MB, so the test writes bytes, not megabytes)."""
    url = _raw_file(tmp_path / "x.safetensors", {"__metadata__": {"k": "v"}})
    size = len(json.dumps({"__metadata__": {"k": "v"}}))
    monkeypatch.setattr(sio, "MAX_HEADER_BYTES", size)
    header = sio.read_header(url, "x.safetensors")
    assert (header.file, header.metadata, header.tensors) == ("x.safetensors", {"k": "v"}, {})
    monkeypatch.setattr(sio, "MAX_HEADER_BYTES", size - 1)
    assert "corrupt or truncated header" in _header_error(url)


def test_source_error_messages_are_exact(tmp_path: Path) -> None:
    with pytest.raises(sio.SafetensorsError, match=f"^{tmp_path} has neither {sio.INDEX_NAME} nor {sio.SINGLE_NAME}$"):
        sio.open_source(str(tmp_path))
    (tmp_path / sio.INDEX_NAME).write_text("{}")
    with pytest.raises(sio.SafetensorsError, match=f"^{tmp_path / sio.INDEX_NAME} is not a valid index: 'weight_map'$"):
        sio.open_source(str(tmp_path))


def test_empty_tensor_keeps_shape_and_dtype(tmp_path: Path) -> None:
    save_file({"e": torch.zeros(0, 3, dtype=torch.int8), "f": torch.ones(2)}, str(tmp_path / sio.SINGLE_NAME))
    got = sio.read_tensors(sio.open_source(str(tmp_path)), ["e", "f"])["e"]
    assert (got.shape, got.dtype) == (torch.Size([0, 3]), torch.int8)


def test_missing_tensors_and_inf_messages_are_exact(tmp_path: Path) -> None:
    w = torch.ones(3)
    w[1] = float("-inf")
    url = str(tmp_path / sio.SINGLE_NAME)
    save_file({"w": w}, url)
    src = sio.open_source(str(tmp_path))
    for names, suffix in ((["a"], ""), (["a", "b", "w"], " (and 1 more)")):
        with pytest.raises(sio.SafetensorsError, match=rf"^tensor a is not in {tmp_path}{re.escape(suffix)}$"):
            sio.read_tensors(src, names)
    with pytest.raises(sio.SafetensorsError, match=f"^tensor w in {url} contains Inf values$"):
        sio.read_tensors(src, ["w"])


def _spaced_file(root: Path, gap_bytes: int) -> sio.SourceIndex:
    """Tensors a, b, c in that order in one file; b (the gap between a and c) is gap_bytes long."""
    save_file({"a": torch.ones(3), "b": torch.zeros(gap_bytes // 4), "c": torch.full((3,), 2.0)},
              str(root / sio.SINGLE_NAME))
    return sio.open_source(str(root))


@pytest.mark.parametrize("gap_bytes, reads", [(sio.COALESCE_GAP_BYTES, 1), (sio.COALESCE_GAP_BYTES + 4, 2)])
def test_coalescing_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap_bytes: int, reads: int) -> None:
    """Neighbours up to COALESCE_GAP_BYTES apart are one range request; farther apart, two."""
    src = _spaced_file(tmp_path, gap_bytes)
    calls = _spy_range_reads(monkeypatch)
    got = sio.read_tensors(src, ["a", "c"])
    assert len(calls) == reads and torch.equal(got["c"], torch.full((3,), 2.0)) and torch.equal(got["a"], torch.ones(3))


def test_shard_changed_after_open_is_named(tmp_path: Path) -> None:
    src = _spaced_file(tmp_path, 16)
    f = tmp_path / sio.SINGLE_NAME
    lo, hi = src.tensors["a"].start, src.tensors["c"].end
    f.write_bytes(f.read_bytes()[:-4])  # c loses its last value
    with pytest.raises(sio.SafetensorsError, match=f"^shard {f} is truncated: reading a got {hi - lo - 4} of {hi - lo} bytes$"):
        sio.read_tensors(src, ["a", "c"])
    f.unlink()
    with pytest.raises(sio.SafetensorsError, match=f"^shard {f} is missing$"):
        sio.read_tensors(src, ["a"])


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.x": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a.y": torch.randn(7, generator=g),
            "c": torch.tensor([1, -2], dtype=torch.int8), "d": torch.randn(2, 2, generator=g).half(),
            "e": torch.randn(1, dtype=torch.float64, generator=g), "a.z": torch.zeros(0, 4, dtype=torch.bfloat16),
            "i": torch.arange(3), "flag": torch.tensor([True, False])}


def _specs(t: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int]]]:
    names = {v: k for k, v in sio.DTYPES.items()}
    return {n: (names[x.dtype], list(x.shape)) for n, x in t.items()}


@pytest.mark.parametrize("where", ["local", "s3_bucket", "gs_bucket", "az_container"])
def test_streamed_shard_is_the_librarys_bytes_holding_one_tensor_at_a_time(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import gc
    import weakref

    root = str(tmp_path) if where == "local" else str(request.getfixturevalue(where))
    t = _mixed_tensors()
    given: list[weakref.ref] = []

    def tensor(name: str) -> torch.Tensor:
        gc.collect()
        assert all(r() is None for r in given), "an earlier tensor is still held"
        out = t[name].clone()
        given.append(weakref.ref(out))
        return out

    url = storage.join(root, "x.safetensors")
    sha, size = sio.write_shard_streaming(url, _specs(t), tensor)
    expected = sio.shard_bytes(t)
    assert storage.read_bytes(url) == expected  # safetensors' own bytes: mixed dtypes, an empty tensor
    assert (sha, size) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert len(given) == len(t)


def test_streamed_shard_that_fails_publishes_nothing(tmp_path: Path) -> None:
    t = _mixed_tensors()
    url = str(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="tensor i: .* the layout says I64 \\(4,\\)"):
        sio.write_shard_streaming(url, {**_specs(t), "i": ("I64", [4])}, t.__getitem__)
    assert list(tmp_path.iterdir()) == []
