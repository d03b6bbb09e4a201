from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aser.pipeline import manifest as mf
from aser.checkpoint import state as run_state
from aser.checkpoint import storage
from aser.checkpoint.state import FileRecord
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
        assert run_state.load_worker_state(dest, 0) is None
        h = torch.randn(2, 5, 8, dtype=torch.bfloat16)
        run_state.save_worker_state(dest, 0, 3, {"hidden": h})
        run_state.save_worker_state(dest, 1, 3, {"hidden": h + 1})
        layer, state = run_state.load_worker_state(dest, 1)  # type: ignore[misc]
        assert layer == 3 and torch.equal(state["hidden"], h + 1)
        run_state.clear_state(dest)
        assert run_state.load_worker_state(dest, 0) is None


# ---------------------------------------------------------------- the file format


def test_json_is_canonical_and_redacts_the_source(tmp_path: Path) -> None:
    """Sorted keys, 2-space indent, layer keys as strings, credentials dropped from source_url:
    manifests of two runs diff line by line."""
    m = mf.new_manifest(RunConfig(source="s3://key:secret@src/m", dest=str(tmp_path)), FP, "cc")
    m.record_layer(mf.LayerRecord(index=2, status=mf.LAYER_DONE))
    m.summary = {"peak_rss_bytes": {"driver": 7}}
    m.final_files = {"config.json": FileRecord("ab" * 32, 12)}
    text = m.to_json()
    d = json.loads(text)
    assert text == json.dumps(d, indent=2, sort_keys=True) + "\n"
    assert set(d) == {f.name for f in dataclasses.fields(mf.Manifest)}
    assert d["source_url"] == "s3://***@src/m"
    assert "secret" not in text and d["config"]["source"] == "s3://***@src/m"
    assert list(d["layers"]) == ["2"]
    loaded = mf.Manifest.from_json(text)
    assert loaded.summary == m.summary and loaded.layers == m.layers
    assert loaded.final_files == m.final_files


def test_optional_fields_default_when_absent() -> None:
    """An older manifest without summary / per-layer figures still loads, with empty defaults."""
    assert mf.LayerRecord.from_dict({"index": "3", "status": "done"}) == mf.LayerRecord(3, "done")
    m = mf.Manifest("a", {}, {}, None, {})
    d = json.loads(m.to_json())
    del d["summary"], d["final_files"]
    assert mf.Manifest.from_json(json.dumps(d)) == m


def test_other_manifest_version_is_refused_by_number() -> None:
    text = mf.Manifest("a", {}, {}, None, {}, manifest_version=mf.MANIFEST_VERSION + 1).to_json()
    with pytest.raises(mf.ManifestError, match=rf"^manifest version {mf.MANIFEST_VERSION + 1} is not "
                                               rf"{mf.MANIFEST_VERSION}$"):
        mf.Manifest.from_json(text)


def test_calibration_hash_ignores_the_integer_dtype() -> None:
    """Token ids hash by value: the same ids as int32 or int64 are the same calibration data."""
    t = torch.arange(12).reshape(3, 4)
    assert mf.calibration_sha256(t.to(torch.int32)) == mf.calibration_sha256(t)


# ---------------------------------------------------------------- resume checks


def test_diff_paths_reports_added_removed_and_retyped_keys() -> None:
    old = {"a": {"b": 1, "c": 2}, "d": {"e": 1}, 1: "x"}
    new = {"a": {"b": 1, "z": 2}, "d": 3, 1: "y"}
    # Mixed key types (int and str) sort by their text instead of failing.
    assert mf._diff_paths(old, new) == ["1", "a.c", "a.z", "d"]


def _mismatch(m: mf.Manifest, dest: str, fp: dict, calib: str | None, **cfg_kw) -> str:
    with pytest.raises(mf.ManifestError) as e:
        mf.check_compatible(m, _cfg(dest, **cfg_kw), fp, calib)
    return str(e.value)


def test_mismatch_messages_list_every_difference(tmp_path: Path) -> None:
    dest = str(tmp_path)
    m = _started(dest)
    fp = {"index_sha256": "zz", "shards": {"model.safetensors": FP["shards"]["model.safetensors"],  # type: ignore[index]
                                          "extra.safetensors": {"size_bytes": 1}}}
    assert _mismatch(m, dest, fp, "cc") == (
        "the source changed since this destination was started (index_sha256, shards.extra.safetensors "
        "differ); use a new destination or restore the source"
    )
    del m.config["calib"]["seed"]  # a field this manifest does not have
    assert _mismatch(m, dest, FP, "cc", method=MethodConfig(rank=16, act_quant="marlin")) == (
        "the config differs from the one this destination was started with (calib.seed: '<absent>' -> 0, "
        "method.rank: 32 -> 16); rerun with the original config or use a new destination"
    )
    assert _mismatch(_started(dest), dest, FP, None) == (
        "the calibration data differs from the one this destination was started with (sha256 cc -> None); "
        "rerun with the same calib.source / num_samples / seq_len / seed or use a new destination"
    )


def test_resume_ignored_field_covers_its_subfields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = str(tmp_path)
    m = _started(dest)
    monkeypatch.setattr(mf, "RESUME_IGNORED_FIELDS", frozenset({"ray_address", "workers"}))
    mf.check_compatible(m, _cfg(dest, workers=WorkersConfig(num_workers=3, num_cpus_per_worker=2.0)), FP, "cc")
    with pytest.raises(mf.ManifestError, match=r"calib\.seed: 0 -> 1\)"):
        mf.check_compatible(m, _cfg(dest, workers=WorkersConfig(num_workers=3), calib=CalibConfig(seed=1)), FP, "cc")


def test_an_unfinished_layer_does_not_hide_later_finished_ones(tmp_path: Path) -> None:
    dest = str(tmp_path)
    m = mf.new_manifest(_cfg(dest), FP, "cc")
    m.record_layer(mf.LayerRecord(index=0, status="started"))
    m.record_layer(mf.LayerRecord(index=1, status=mf.LAYER_DONE))
    assert mf.finished_layers(m, dest) == {1}


# ---------------------------------------------------------------- calibration state


def test_worker_states_by_boundary_and_pruning(tmp_path: Path) -> None:
    dest = str(tmp_path)
    for layer in (2, 3, 10):
        run_state.save_worker_state(dest, 0, layer, {"hidden": torch.full((2,), float(layer))})
    run_state.save_worker_state(dest, 1, 11, {"hidden": torch.zeros(2)})
    # Strays in the state folder: another rank's file (same name length) and a copy whose
    # layer number does not parse; neither is worker 0's latest state.
    (tmp_path / run_state.STATE_DIR / "worker-00000-next-(copy).pt").write_bytes(b"")
    (tmp_path / run_state.STATE_DIR / "worker-00000-next-00012.pt.bak").write_bytes(b"")
    layer, state = run_state.load_worker_state(dest, 0)  # type: ignore[misc]
    assert layer == 10 and torch.equal(state["hidden"], torch.full((2,), 10.0))
    assert run_state.load_worker_state(dest, 0, 3)[0] == 3  # type: ignore[index]
    assert run_state.load_worker_state(dest, 0, 4) is None
    run_state.prune_worker_states(dest, 0, 10)
    assert [run_state.has_worker_state(dest, 0, k) for k in (2, 3, 10)] == [False, False, True]
    assert run_state.has_worker_state(dest, 1, 11)
    mf.save_manifest(dest, mf.new_manifest(_cfg(dest), FP, "cc"))
    run_state.clear_state(dest)  # the state folder only, not the destination's files
    assert not (tmp_path / run_state.STATE_DIR).exists() and mf.load_manifest(dest) is not None


def test_sparse_states_keep_the_newest_resume_point_and_agree_across_workers(tmp_path: Path) -> None:
    """Not every boundary is saved (pipeline.save_policy): pruning at the first unfinished layer
    keeps the newest state at or before it (older ones, never the one a resume needs, and never
    newer ones a worker ahead wrote), and a resume starts at the newest boundary all workers saved."""
    dest = str(tmp_path)
    for rank, layers in ((0, (2, 4, 6, 8)), (1, (2, 4, 8))):
        for layer in layers:
            run_state.save_worker_state(dest, rank, layer, {"hidden": torch.zeros(1)})
    assert run_state.latest_common_state(dest, range(2), 7) == 4  # 6: worker 1 has none
    assert run_state.latest_common_state(dest, range(2), 8) == 8
    assert run_state.latest_common_state(dest, range(2), 1) == 0  # none: from the embedding
    assert run_state.latest_common_state(dest, range(3), 8) == 0  # worker 2 saved nothing
    run_state.prune_worker_states(dest, 0, 5)
    assert [run_state.has_worker_state(dest, 0, k) for k in (2, 4, 6, 8)] == [False, True, True, True]
    run_state.prune_worker_states(dest, 1, 1)  # nothing at or before layer 1: nothing to drop
    assert [run_state.has_worker_state(dest, 1, k) for k in (2, 4, 8)] == [True, True, True]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_worker_state_names_the_file(tmp_path: Path, damage: str) -> None:
    dest = str(tmp_path)
    run_state.save_worker_state(dest, 0, 4, {"hidden": torch.zeros(2)})
    path = tmp_path / run_state.STATE_DIR / "worker-00000-next-00004.pt"
    # cut short: torch.load raises RuntimeError; not a zip at all: pickle.UnpicklingError
    path.write_bytes(path.read_bytes()[:-10] if damage == "truncated" else b"garbage")
    with pytest.raises(run_state.StateError, match=r"^calibration state .*worker-00000-next-00004\.pt is corrupt \(.*\); "
                                               r"delete \.aser_state/ to recompute it$"):
        run_state.load_worker_state(dest, 0)


# ---------------------------------------------------------------- extra cost of the adapter


def test_extra_cost_counts_values_and_bits() -> None:
    cost = mf.extra_cost([((3, 4), 16), ((5, 3), 32)], 100)
    assert (cost.adapter_values, cost.adapter_bits, cost.quantized_weights) == (27, 3 * 4 * 16 + 5 * 3 * 32, 100)
    assert cost.to_dict() == {"adapter_values": 27, "adapter_bits": 672, "quantized_weights": 100,
                              "extra_params_pct": 27.0, "extra_bits_per_weight": 6.72}
    empty = mf.extra_cost([], 0)
    assert (empty.percent, empty.bits_per_weight) == (0.0, 0.0)


def test_shipped_extra_cost_reads_headers_of_both_formats(tmp_path: Path) -> None:
    """int-quantized modules count their int8 ``weight``; pack-quantized ones their ``weight_shape``;
    the adapter counts at its stored dtype. Built by hand so the test needs no export run."""
    from aser.checkpoint import export
    from aser.checkpoint import safetensors_io as sio

    dest = str(tmp_path)
    base = {
        "a.weight": torch.zeros(6, 8, dtype=torch.int8), "a.weight_scale": torch.ones(6, 1),
        "b.weight_packed": torch.zeros(4, 2, dtype=torch.int32), "b.weight_shape": torch.tensor([4, 16]),
        "b.weight_scale": torch.ones(4, 1), "norm.weight": torch.ones(8),
    }
    sio.write_shard(storage.join(dest, sio.SINGLE_NAME), base)
    assert mf.shipped_extra_cost(dest).to_dict()["adapter_values"] == 0  # no adapter written yet
    adapter = {"a.lora_A.weight": torch.zeros(2, 8, dtype=torch.bfloat16), "a.lora_B.weight": torch.zeros(6, 2)}
    sio.write_shard(storage.join(dest, export.ADAPTER_DIR, export.ADAPTER_WEIGHTS_NAME), adapter)
    cost = mf.shipped_extra_cost(dest)
    assert (cost.adapter_values, cost.adapter_bits, cost.quantized_weights) == (28, 16 * 16 + 12 * 32, 6 * 8 + 4 * 16)


def test_credentials_never_reach_the_manifest_and_resume_still_matches(tmp_path: Path) -> None:
    """The manifest is written to DEST, readable by anyone who can read the model: no URL in it
    keeps a ``user:password@``; a rerun with the same URLs is still the same config."""
    cfg = RunConfig(source="s3://key:secret@src/m", dest=str(tmp_path),
                    calib=CalibConfig(source="s3://k2:s2@data/c.txt"))
    m = mf.new_manifest(cfg, FP, "cc")
    text = m.to_json()
    assert "secret" not in text and "s2" not in text
    assert m.config["calib"]["source"] == "s3://***@data/c.txt"
    mf.check_compatible(mf.Manifest.from_json(text), cfg, FP, "cc")
