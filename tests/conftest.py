import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# Ray binds to 127.0.0.1 only; test traffic stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The unit tests' matrices are tiny: on a 2-core machine torch's intra-op threads spin more than
# they work (the numerics tests took 51 s of wall time with default threads, 12 s with one). Ray's
# workers are other processes and keep their own settings.
torch.set_num_threads(1)

DATA = Path(os.environ.get("ASER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# CI services set CI=true; there a missing data folder is a broken setup, not an optional extra.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared test data; the end-to-end tests skip without it, except in CI, where they fail
    (a skipped suite would pass CI having tested nothing end to end)."""
    if not DATA.is_dir():
        msg = f"test data not found at {DATA} (set ASER_TEST_DATA)"
        if IN_CI:
            pytest.fail(msg + "; CI=true, so this is an error", pytrace=False)
        pytest.skip(msg)
    return DATA


@pytest.fixture(scope="session")
def stories_dir(data_dir: Path) -> Path:
    return data_dir / "stories260K"


# ---------------------------------------------------------------- S3 on loopback (moto)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1; killed by PID at teardown."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, reachable through the standard AWS environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"aser-test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
