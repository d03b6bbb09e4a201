import os
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
