"""Bad input to `aser quantize`: each a clear error naming the cause, DEST never complete. And
a missing test-data folder: an error in CI, not a silent skip."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from safetensors.torch import load_file, save_file

from aser.pipeline import driver
from aser.checkpoint import safetensors_io as sio
from pipeline_run_helpers import copy_checkpoint, run_config

pytestmark = pytest.mark.timeout(900)  # a hang guard; a loaded 2-core machine needs minutes


@pytest.fixture
def calib(data_dir: Path) -> str:
    return str(data_dir / "tinystories" / "sample.txt")


def _sharded(stories_dir: Path, out: Path) -> Path:
    """stories260K as 2 shards + index (layers 0-2 in the first, the rest in the second)."""
    copy_checkpoint(stories_dir, out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    first = {k: v for k, v in state.items() if any(k.startswith(f"model.layers.{i}.") for i in range(3))}
    second = {k: v for k, v in state.items() if k not in first}
    names = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {}
    for name, part in names.items():
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / sio.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _fails(source: Path, dest: Path, calib: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        driver.run(run_config(str(source), str(dest), calib), show_progress=False)
    assert not (dest / sio.INDEX_NAME).exists()


def test_missing_shard(stories_dir: Path, tmp_path: Path, calib: str) -> None:
    src = _sharded(stories_dir, tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    _fails(src, tmp_path / "out", calib, r"shard .*model-00002-of-00002.safetensors is missing")


def test_tensor_missing_from_its_shard(stories_dir: Path, tmp_path: Path, calib: str) -> None:
    src = _sharded(stories_dir, tmp_path / "src")
    index = json.loads((src / sio.INDEX_NAME).read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    (src / sio.INDEX_NAME).write_text(json.dumps(index))
    _fails(src, tmp_path / "out", calib, r"model.layers.1.mlp.up_proj.weight .*missing from that shard")


def test_tensor_missing_from_the_source(stories_dir: Path, tmp_path: Path, calib: str) -> None:
    src = copy_checkpoint(stories_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.3.self_attn.k_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    _fails(src, tmp_path / "out", calib, r"model.layers.3.self_attn.k_proj.weight \(layer 3\) is not in the source")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_bad_header(stories_dir: Path, tmp_path: Path, calib: str, damage: str) -> None:
    src = copy_checkpoint(stories_dir, tmp_path / "src")
    blob = (src / "model.safetensors").read_bytes()
    if damage == "truncated":
        (src / "model.safetensors").write_bytes(blob[:1000])
        match = r"model.safetensors has a corrupt or truncated header"
    else:
        (n,) = struct.unpack("<Q", blob[:8])
        (src / "model.safetensors").write_bytes(blob[:8] + b"{" * n + blob[8 + n :])
        match = r"model.safetensors has a corrupt header"
    _fails(src, tmp_path / "out", calib, match)


def test_calibration_text_too_short(stories_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    _fails(stories_dir, tmp_path / "out", str(short), r"calibration text too short")


def test_unwritable_dest(stories_dir: Path, tmp_path: Path, calib: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # (Tests run as root, which ignores permission bits: a DEST under a regular file is
    # unwritable for everyone.)
    _fails(stories_dir, blocker / "out", calib, r"DEST .*file/out is not writable")


def test_nan_weights(ray_cluster: str, stories_dir: Path, tmp_path: Path, calib: str) -> None:
    src = copy_checkpoint(stories_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.2.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    dest = tmp_path / "out"
    _fails(src, dest, calib, r"tensor model.layers.2.mlp.gate_proj.weight in .*model.safetensors contains NaN")
    # Layers before the bad one were finished and recorded; the bad one was not.
    mf = json.loads((dest / "aser_manifest.json").read_text())
    assert {0, 1} <= {int(k) for k in mf["layers"]} and "2" not in mf["layers"]


def test_missing_data_fails_in_ci_and_skips_elsewhere(tmp_path: Path) -> None:
    """tests/conftest.py's data_dir, run in a child pytest on a one-line test: without the data
    folder it skips on a workstation but fails under CI=true."""
    (tmp_path / "test_needs_data.py").write_text("def test_it(data_dir):\n    pass\n")
    tests_dir = Path(__file__).resolve().parents[1]
    for ci, outcome in (("true", "1 error"), ("", "1 skipped")):
        env = {**os.environ, "ASER_TEST_DATA": str(tmp_path / "absent"), "CI": ci,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")]))}
        # -p conftest loads tests/conftest.py as a plugin; -c devnull keeps the project's addopts out.
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "-p", "conftest", "-p", "no:cacheprovider",
             "--rootdir", str(tmp_path), "test_needs_data.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert outcome in proc.stdout, (ci, proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [(None, None, "local"), (None, "ray://head:10001", None), ("ray://other:10001", "ray://head:10001", "ray://other:10001")],
)
def test_ray_address(address: str | None, env: str | None, expected: str | None,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No --address starts a private local Ray ("local"), never joining a cluster another process
    on the machine started; inside `ray job submit` (RAY_ADDRESS set) Ray finds its cluster; an
    explicit --address wins."""
    calls: list[dict] = []
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kw: calls.append(kw))
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert driver._init_ray(run_config("src", "dest", "calib", ray_address=address)) is True
    assert calls and calls[0].get("address") == expected
    assert ("num_cpus" in calls[0]) == (expected == "local")


STUCK_RAY = r'''
import ctypes, subprocess, sys
import ray
from aser.pipeline import cli, driver

def stuck_init(*args, **kwargs):  # a start that never returns, with a process of its own
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child {child.pid}", flush=True)
    # libc's sleep through PyDLL keeps the GIL, as Ray's stuck core-worker start did: no thread
    # of this process runs again.
    ctypes.PyDLL(None).sleep(600)

ray.init = stuck_init
driver.RAY_START_TIMEOUT_S = 3.0
sys.exit(cli.main(sys.argv[1:]))
'''


def test_a_local_ray_start_that_never_returns_stops_clearly(tmp_path: Path, stories_dir: Path, calib: str) -> None:
    # benchmarks/chaos.py: a Ray worker killed while Ray started left ray.init waiting for ever.
    from aser.pipeline import lease

    dest = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", STUCK_RAY, "quantize", str(stories_dir), str(dest), "--calib", calib,
         "--num-samples", "4", "--seq-len", "16", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # the driver cannot stop by itself
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "aser: error: the local Ray instance did not start within 3 s")
    child = int(proc.stdout.split("child ")[1].split()[0])
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert not any((dest / lease.LEASE_DIR).glob("*"))  # the lease released: the rerun need not wait for it


def test_workers_that_hold_every_cpu_are_refused_before_any_work(
    ray_cluster: str, stories_dir: Path, tmp_path: Path, calib: str
) -> None:
    """3 workers x 3 CPUs on the test cluster's 3 x 3 CPUs: each actor fits a node, but no task of
    any layer could ever start beside them. Before the check this run waited forever, silently."""
    from aser.pipeline.resources import ResourceError

    dest = tmp_path / "out"
    config = run_config(str(stories_dir), str(dest), calib, num_workers=3)
    config = dataclasses.replace(config, workers=dataclasses.replace(config.workers, num_cpus_per_worker=3.0))
    with pytest.raises(ResourceError, match=r"^3 calibration worker\(s\) x 3 CPU hold 9 of the Ray cluster's 9 CPUs"):
        driver.run(config, show_progress=False)
    assert not (dest / "aser_manifest.json").exists()  # refused before any work
