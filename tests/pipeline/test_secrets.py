"""Credentials never leave the environment they were given in: a whole `aser quantize` from S3
to S3 with AWS credentials in the environment, then a failing one, and everything either printed
or wrote — stdout, stderr, every object in DEST (manifest, config, adapter), every
file under the run's own Ray session directory (driver, worker and dashboard logs) — is searched
for the key id and the secret. A URL carrying a password is refused without echoing it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aser.checkpoint import storage
from aser.pipeline import cli
from pipeline_run_helpers import NUM_SAMPLES, SEQ_LEN

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Short: Ray's socket paths under it must fit in 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="aser-ray-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tree_bytes(url: str) -> dict[str, bytes]:
    fs, path = storage.resolve(url)
    return {p: bytes(fs.cat_file(p)) for p in fs.find(path)}


def _leaks(blobs: dict[str, bytes], secrets: list[str]) -> list[tuple[str, str]]:
    return [(name, s) for name, b in blobs.items() for s in secrets if s.encode() in b]


def test_no_credential_in_output_logs_or_errors(s3_bucket: str, stories_dir: Path, data_dir: Path,
                                                ray_tmp: Path) -> None:
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "aser-secret-" + uuid.uuid4().hex
    src, dest = storage.join(s3_bucket, "src"), storage.join(s3_bucket, "out")
    for p in sorted(stories_dir.iterdir()):
        storage.write_bytes_atomic(storage.join(src, p.name), p.read_bytes())
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, whose every log file is ours to read
    base = [sys.executable, "-m", "aser.pipeline.cli", "quantize", "--calib", str(data_dir / "tinystories" / "sample.txt"),
            "--num-samples", str(NUM_SAMPLES), "--seq-len", str(SEQ_LEN), "--rank", "8"]
    ok = subprocess.run([*base, src, dest], env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    failed = subprocess.run([*base, storage.join(s3_bucket, "no-such-model"), storage.join(s3_bucket, "out2")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2 and "aser: error: " in failed.stderr
    written = _tree_bytes(dest)
    assert {"aser_manifest.json", "config.json", "adapter_config.json"} <= {n.rsplit("/", 1)[-1] for n in written}
    logs = {str(p): p.read_bytes() for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()}
    assert any("session_" in n and n.endswith(".log") for n in logs), sorted(logs)[:20]
    printed = {"stdout": ok.stdout.encode(), "stderr": ok.stderr.encode(),
               "failed stderr": failed.stderr.encode()}
    assert _leaks({**printed, **written, **logs}, [key_id, secret]) == []


def test_url_with_a_password_is_refused_without_echoing_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["quantize", "s3://AKIAFAKEKEY:hunter2-secret@bucket/model", str(tmp_path / "out")],
                 ["verify", "s3://AKIAFAKEKEY:hunter2-secret@bucket/out"],
                 ["plan", "gs://user:hunter2-secret@bucket/model"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "credentials in the URL are not accepted" in err and "hunter2-secret" not in err, err
