from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aser.pipeline import manifest as mf
from aser.pipeline import storage
from aser.pipeline.config import CalibConfig, RunConfig, WorkersConfig
from aser.workers.reconstruct import MethodConfig

FP = {"index_sha256": "aa", "shards": {"model.safetensors": {"size_bytes": 10, "header_sha256": "bb"}}}


def _cfg(dest: str, **kw) -> RunConfig:
    return RunConfig(source="s3://src/m", dest=dest, **kw)


def _started(dest: str) -> mf.Manifest:
    m = mf.new_manifest(_cfg(dest), FP, "cc")
    storage.write_bytes_atomic(storage.join(dest, "model-00002-of-00004.safetensors"), b"x" * 5)
    m.record_layer(
        mf.LayerRecord(
            index=0,
            status=mf.LAYER_DONE,
            files={"model-00002-of-00004.safetensors": mf.FileRecord("ff", 5)},
            metrics={"self_attn.q_proj": {"rel_error_before": 0.1, "rel_error_after": 0.05, "rank": 32}},
            seconds={"forward": 1.5},
            bytes_read=100,
            bytes_written=5,
        )
    )
    m.record_layer(mf.LayerRecord(index=1, status="started"))
    mf.save_manifest(dest, m)
    return m


def test_round_trip_and_finished_layers(tmp_path: Path) -> None:
    dest = str(tmp_path)
    m = _started(dest)
    loaded = mf.load_manifest(dest)
    assert loaded == m
    assert set(loaded.versions) == {"aser", "torch", "transformers", "compressed-tensors"}
    assert mf.finished_layers(loaded, dest) == {0}
    # A vanished or resized file un-finishes its layer.
    storage.write_bytes_atomic(storage.join(dest, "model-00002-of-00004.safetensors"), b"x" * 4)
    assert mf.finished_layers(loaded, dest) == set()


def test_fresh_destination_has_no_manifest(tmp_path: Path) -> None:
    assert mf.load_manifest(str(tmp_path)) is None
    assert not mf.is_finished(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert mf.is_finished(str(tmp_path))


def test_compatible_resume_passes_and_ray_address_may_change(tmp_path: Path) -> None:
    dest = str(tmp_path)
    m = _started(dest)
    mf.check_compatible(m, _cfg(dest, ray_address="ray://head:10001"), FP, "cc")


@pytest.mark.parametrize(
    "cfg_kw, fp, calib, match",
    [
        ({}, {**FP, "index_sha256": "zz"}, "cc", r"source changed .*index_sha256"),
        ({"method": MethodConfig(rank=16)}, FP, "cc", r"method\.rank: 32 -> 16"),
        ({"calib": CalibConfig(seed=1)}, FP, "cc", r"calib\.seed: 0 -> 1"),
        ({"workers": WorkersConfig(num_workers=2)}, FP, "cc", r"workers\.num_workers"),
        ({}, FP, "dd", r"calibration data differs"),
    ],
)
def test_mismatch_names_what_changed(tmp_path: Path, cfg_kw, fp, calib, match) -> None:
    dest = str(tmp_path)
    m = _started(dest)
    with pytest.raises(mf.ManifestError, match=match):
        mf.check_compatible(m, _cfg(dest, **cfg_kw), fp, calib)


def test_corrupt_manifest_is_an_error(tmp_path: Path) -> None:
    (tmp_path / mf.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(mf.ManifestError, match="corrupt"):
        mf.load_manifest(str(tmp_path))


def test_calibration_hash_depends_on_values_and_shape() -> None:
    t = torch.arange(12).reshape(3, 4)
    assert mf.calibration_sha256(t) == mf.calibration_sha256(t.clone())
    assert mf.calibration_sha256(t) != mf.calibration_sha256(t.reshape(4, 3))
    t2 = t.clone()
    t2[0, 0] = 99
    assert mf.calibration_sha256(t) != mf.calibration_sha256(t2)


def test_worker_state_round_trip(tmp_path: Path, s3_bucket: str) -> None:
    for dest in (str(tmp_path), storage.join(s3_bucket, "out")):
        assert mf.load_worker_state(dest, 0) is None
        h = torch.randn(2, 5, 8, dtype=torch.bfloat16)
        mf.save_worker_state(dest, 0, 3, {"hidden": h})
        mf.save_worker_state(dest, 1, 3, {"hidden": h + 1})
        layer, state = mf.load_worker_state(dest, 1)  # type: ignore[misc]
        assert layer == 3 and torch.equal(state["hidden"], h + 1)
        mf.clear_state(dest)
        assert mf.load_worker_state(dest, 0) is None
