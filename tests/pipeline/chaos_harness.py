"""Chaos trials of `aser quantize` as a user runs it: a subprocess with its own local Ray, S3 (moto
on loopback, optionally behind tests/fault_proxy.py) on both sides.

- ``driver_kill``: SIGKILL the driver and every process of its run (its local Ray included: the
  machine is gone) at a time drawn uniformly over a normal run's wall time, then rerun the same
  command until it completes;
- ``worker_kill``: SIGKILL one Ray worker process of the run (drawn at random among those alive)
  at a random time; the run must recover, or stop with a clear error and complete on a rerun;
- ``storage_faults``: the run's S3 traffic through a FaultProxy at seeded rates.

Each trial's output is compared byte for byte with an uninterrupted run of the same command. A
run's processes are found by a marker in their environment (every process Ray starts inherits
it), so only processes the trial started are ever killed. Used by tests/pipeline/test_chaos.py
and benchmarks/chaos.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aser.checkpoint import storage

MARKER = "ASER_CHAOS_RUN"
RUN_TIMEOUT_S = 400  # one run of stories260K, generous for a loaded 2-core machine
MANIFEST = "aser_manifest.json"


@dataclass
class Setup:
    endpoint: str  # the S3 endpoint the run uses (moto, or a proxy in front of it)
    source: str  # s3:// URL of the checkpoint
    calib: str  # calibration text (local path)
    num_samples: int = 12
    seq_len: int = 64
    rank: int = 8
    env: dict[str, str] = field(default_factory=dict)

    def command(self, dest: str) -> list[str]:
        return [sys.executable, "-m", "aser.pipeline.cli", "quantize", self.source, dest, "--calib", self.calib,
                "--num-samples", str(self.num_samples), "--seq-len", str(self.seq_len), "--rank", str(self.rank),
                "--no-progress"]


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    marker: str
    ray_tmp: str
    log: Path
    t0: float
    output: str = ""  # the driver's stdout and stderr, once the run is over

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_run(self)
            raise

    def stderr(self) -> str:
        return self.output


def start(setup: Setup, dest: str, endpoint: str | None = None, extra_args: tuple[str, ...] = (),
          extra_env: dict[str, str] | None = None) -> Run:
    """`aser quantize` of setup's source into DEST, as a process group with its own local Ray."""
    return spawn(setup, [*setup.command(dest), *extra_args], endpoint, extra_env)


def spawn(setup: Setup, argv: list[str], endpoint: str | None = None, extra_env: dict[str, str] | None = None) -> Run:
    """Any command with setup's S3 environment, marked (``run_pids``) and with its own Ray dir."""
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="aser-chaos-", dir="/tmp")  # short: Ray's socket paths
    log = Path(ray_tmp) / "driver.log"
    env = {**os.environ, **setup.env, **(extra_env or {}), MARKER: marker, "RAY_TMPDIR": ray_tmp,
           "AWS_ENDPOINT_URL": endpoint or setup.endpoint}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Run(proc, marker, ray_tmp, log, time.perf_counter())


def run_pids(marker: str) -> list[int]:
    """Processes whose environment carries this run's marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


def ray_worker_pids(marker: str) -> list[int]:
    """The run's Ray worker processes (named ``ray::...``, not Ray's own daemons)."""
    out = []
    for pid in run_pids(marker):
        cmd = _name(pid)
        if cmd.startswith("ray::") and "DashboardAgent" not in cmd and "RuntimeEnvAgent" not in cmd:
            out.append(pid)
    return out


def kill_run(run: Run) -> None:
    """SIGKILL every process of the run (the driver and the local Ray it started)."""
    for _ in range(3):
        pids = run_pids(run.marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        run.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    if run.log.exists():
        run.output = run.log.read_text(errors="replace")
    shutil.rmtree(run.ray_tmp, ignore_errors=True)


def finish(run: Run, timeout: float) -> tuple[int, float]:
    """Wait for the run; then clear any process it left (a local Ray is stopped by its driver).
    A run still going after ``timeout`` is killed and counts as a failure (rc -1, its output
    ending in a line that says it hung), so one hang does not end a whole benchmark."""
    try:
        rc = run.wait(timeout)
    except subprocess.TimeoutExpired:  # run.wait killed it and read its output
        run.output += f"\nhung: no exit within {timeout:.0f} s, killed"
        return -1, time.perf_counter() - run.t0
    wall = time.perf_counter() - run.t0
    kill_run(run)
    return rc, wall


def dest_files(dest: str) -> dict[str, bytes]:
    """Every object under DEST but the manifest (it records times), by relative name."""
    fs, path = storage.resolve(dest)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # listings this process cached while another process wrote DEST
    return {p[len(path) + 1 :]: bytes(fs.cat_file(p)) for p in fs.find(path)
            if not p.endswith("/" + MANIFEST)}


def done_stages(dest: str) -> int:
    try:
        return len(json.loads(storage.read_text(storage.join(dest, MANIFEST))).get("layers", {}))
    except (OSError, ValueError):
        return 0


def rerun_until_complete(setup: Setup, dest: str, timeout: float, attempts: int = 3) -> dict[str, Any]:
    """The same command again until it exits 0; each attempt's status and wall time."""
    tries = []
    for _ in range(attempts):
        run = start(setup, dest)
        rc, wall = finish(run, timeout)
        tries.append({"rc": rc, "wall_s": wall, "error": _last_error(run.stderr()) if rc else None})
        if rc == 0:
            break
    return {"attempts": tries, "completed": bool(tries) and tries[-1]["rc"] == 0}


def _last_error(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("aser: error: ")]
    return lines[-1] if lines else (text.strip().splitlines() or [""])[-1][:500]


def driver_kill(setup: Setup, dest: str, at_s: float, timeout: float) -> dict[str, Any]:
    run = start(setup, dest)
    deadline = run.t0 + at_s
    while time.perf_counter() < deadline and run.proc.poll() is None:
        time.sleep(0.05)
    finished_first = run.proc.poll() is not None
    killed_at = time.perf_counter() - run.t0
    kill_run(run)
    stages = done_stages(dest)
    rerun = rerun_until_complete(setup, dest, timeout)
    return {"kind": "driver_kill", "at_s": at_s, "killed_at_s": killed_at, "finished_before_kill": finished_first,
            "stages_done_at_kill": stages, **rerun}


def worker_kill(setup: Setup, dest: str, at_s: float, rng: random.Random, timeout: float) -> dict[str, Any]:
    run = start(setup, dest)
    deadline = run.t0 + at_s
    while time.perf_counter() < deadline and run.proc.poll() is None:
        time.sleep(0.05)
    victim = None
    workers: list[int] = []
    while run.proc.poll() is None and not workers:  # the first worker may not have started yet
        alive = ray_worker_pids(run.marker)
        busy = [pid for pid in alive if not _name(pid).startswith("ray::IDLE")]
        workers = sorted(busy or alive)
        if not workers:
            time.sleep(0.05)
    if run.proc.poll() is None:
        if workers:
            victim = rng.choice(workers)
            name = _name(victim)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                name += " (gone before the kill)"
            victim = {"pid": victim, "name": name, "killed_at_s": time.perf_counter() - run.t0}
    rc, wall = finish(run, timeout)
    first = {"rc": rc, "wall_s": wall, "error": _last_error(run.stderr()) if rc else None}
    rerun = {"attempts": [], "completed": True} if rc == 0 else rerun_until_complete(setup, dest, timeout)
    return {"kind": "worker_kill", "at_s": at_s, "victim": victim, "first_run": first, **rerun,
            "completed": rc == 0 or rerun["completed"]}


def storage_faults(setup: Setup, dest: str, proxy_url: str, timeout: float) -> dict[str, Any]:
    run = start(setup, dest, endpoint=proxy_url)
    rc, wall = finish(run, timeout)
    first = {"rc": rc, "wall_s": wall, "error": _last_error(run.stderr()) if rc else None}
    rerun = {"attempts": [], "completed": True} if rc == 0 else rerun_until_complete(setup, dest, timeout)
    return {"kind": "storage_faults", "first_run": first, **rerun, "completed": rc == 0 or rerun["completed"]}


def upload(local_dir: Path, url: str) -> None:
    for p in sorted(local_dir.iterdir()):
        if p.is_file():
            storage.write_bytes_atomic(storage.join(url, p.name), p.read_bytes())


def node_loss(setup: Setup, dest: str, after_stages: int, timeout: float) -> dict[str, Any]:
    """tests/pipeline/node_loss_run.py: a 3-node cluster loses a worker node (the one holding a
    calibration actor) once ``after_stages`` stages are recorded; rerun (no loss) if it stopped."""
    script = str(Path(__file__).with_name("node_loss_run.py"))
    env = {**os.environ, **setup.env, "AWS_ENDPOINT_URL": setup.endpoint}
    env.pop("RAY_ADDRESS", None)
    runs = []
    for after in (after_stages, -1, -1):
        ray_tmp = tempfile.mkdtemp(prefix="aser-nl-", dir="/tmp")
        try:
            proc = subprocess.run([sys.executable, script, str(after), *setup.command(dest)[3:]], capture_output=True,
                                  text=True, timeout=timeout, env={**env, "RAY_TMPDIR": ray_tmp})
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "status": "crashed", "error": proc.stderr[-2000:]}
        result["recoveries"] = len(result.get("recoveries", []))
        if result["status"] == "error":  # a ValueError from driver.run: what the CLI prints
            result["error"] = "aser: error: " + result["error"]
        runs.append(result)
        if result["status"] == "complete":
            break
    return {"kind": "node_loss", "after_stages": after_stages, "first_run": runs[0], "attempts": runs[1:],
            "completed": runs[-1]["status"] == "complete"}
