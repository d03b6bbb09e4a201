import os
from pathlib import Path

# Ray binds to 127.0.0.1 only; test traffic stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

DATA = Path(os.environ.get("ASER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"test data not found at {DATA} (set ASER_TEST_DATA)")
    return DATA


@pytest.fixture(scope="session")
def stories_dir(data_dir: Path) -> Path:
    return data_dir / "stories260K"
