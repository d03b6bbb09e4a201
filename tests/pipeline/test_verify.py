"""`aser verify DEST`: a finished run verifies clean, locally and on S3; each kind of damage done
behind the run's back (a flipped byte, a truncated file, a deleted file, a shard the index names
that the run never wrote, an unfinished run, no manifest) is reported by name, exit status 1
(2 when there is nothing to verify against)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aser.checkpoint import storage
from aser.pipeline import cli, driver, verify
from pipeline_run_helpers import output_files, run_config

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def finished(ray_cluster: str, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("verify") / "out"
    res = driver.run(run_config(str(data_dir / "stories260K"), str(dest), str(data_dir / "tinystories" / "sample.txt")),
                     show_progress=False)
    assert res.status == "complete"
    return dest


def _copy(finished: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(finished, dest)
    return dest


def _run_cli(dest: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    rc = cli.main(["verify", dest, "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_finished_run_verifies_and_every_output_file_is_checked(finished: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    dest = _copy(finished, tmp_path)
    rc, report = _run_cli(str(dest), capsys)
    assert rc == 0 and report["ok"] and report["findings"] == []
    shipped = output_files(str(dest))  # every file but the manifest
    assert report["files_checked"] == len(shipped)
    assert report["bytes_checked"] == sum(len(b) for b in shipped.values())
    rc = cli.main(["verify", str(dest), "--no-progress"])
    assert rc == 0 and ": OK: " in capsys.readouterr().out


def _findings(dest: Path) -> set[tuple[str, str]]:
    return {(f.name, f.problem) for f in verify.verify(str(dest)).findings}


def test_each_kind_of_damage_is_named(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = _copy(finished, tmp_path)
    shard = dest / "model-00004-of-00007.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, size unchanged
    shard.write_bytes(bytes(data))
    adapter = dest / "aser_adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-1])
    (dest / "tokenizer.json").unlink()
    assert _findings(dest) == {
        ("model-00004-of-00007.safetensors", "sha256"),
        ("aser_adapter/adapter_model.safetensors", "size"),
        ("tokenizer.json", "missing"),
    }
    rc = cli.main(["verify", str(dest), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "SHA256 model-00004-of-00007.safetensors" in err and "MISSING tokenizer.json" in err


def test_index_naming_an_unwritten_shard_or_dropping_one(finished: Path, tmp_path: Path) -> None:
    dest = _copy(finished, tmp_path)
    index_path = dest / "model.safetensors.index.json"
    text = index_path.read_text()
    assert '"model-00002-of-00007.safetensors"' in text
    # Same length, other bytes: every entry of shard 2 moved to a shard the run never wrote.
    index_path.write_text(text.replace('"model-00002-of-00007.safetensors"', '"model-00009-of-00009.safetensors"'))
    # The index's own bytes no longer match; its content is not trusted, so only that is named.
    assert _findings(dest) == {("model.safetensors.index.json", "sha256")}
    # With the manifest's record of the index brought along (a consistent lie), the content is
    # checked: a shard nobody recorded, and a recorded shard the index dropped.
    mf_path = dest / "aser_manifest.json"
    mf = json.loads(mf_path.read_text())
    sha, size = storage.sha256_and_size(str(index_path))
    mf["final_files"]["model.safetensors.index.json"] = {"sha256": sha, "size_bytes": size}
    mf_path.write_text(json.dumps(mf))
    assert _findings(dest) == {("model-00009-of-00009.safetensors", "unrecorded"),
                               ("model-00002-of-00007.safetensors", "not-in-index")}


def test_unfinished_run_and_missing_manifest(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = _copy(finished, tmp_path)
    mf_path = dest / "aser_manifest.json"
    mf = json.loads(mf_path.read_text())
    mf["final_files"] = {}
    mf_path.write_text(json.dumps(mf))
    assert ("aser_manifest.json", "incomplete") in _findings(dest)
    mf_path.unlink()
    rc = cli.main(["verify", str(dest)])
    assert rc == 2 and "not written by aser quantize" in capsys.readouterr().err


def test_s3_destination_verifies_and_a_changed_object_is_named(finished: Path, s3_bucket: str) -> None:
    dest = storage.join(s3_bucket, "verify-out")
    for p in sorted(finished.rglob("*")):
        if p.is_file():
            storage.write_bytes_atomic(storage.join(dest, p.relative_to(finished).as_posix()), p.read_bytes())
    report = verify.verify(dest)
    assert report.ok and report.files_checked == len(output_files(str(finished)))
    storage.write_bytes_atomic(storage.join(dest, "config.json"), b"{}\n")
    assert {(f.name, f.problem) for f in verify.verify(dest).findings} == {("config.json", "size")}

