"""cluster/slurm/aser.sbatch on a real Slurm: a one-node cluster (Debian's slurmctld + slurmd,
authenticated by munge) started on this machine with its own configuration, state and munge
socket, its node at 127.0.0.1. The unmodified script is submitted with `sbatch` on stories260K,
S3 (moto on loopback) to S3, with the flags and variables its header documents for CPU nodes:
the job starts Ray through `srun`, runs `aser quantize` against it, ends byte-identical to the
chaos harness's run of the same checkpoint and settings, and leaves no Ray process behind. A
job cancelled with `scancel` mid-run stops its driver and its Ray, and the same submission
again resumes. The daemons are started and stopped by PID; no system service is touched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aser.checkpoint import storage
from aser.pipeline import lease
from chaos_harness import MARKER, RUN_TIMEOUT_S, dest_files, done_stages, run_pids

pytestmark = [pytest.mark.timeout(900), pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "cluster" / "slurm" / "aser.sbatch"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "squeue", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Slurm:
    root: Path
    env: dict[str, str]  # SLURM_CONF and the test's S3 environment
    cpus: int
    markers: list[str]  # one per job: in the environment of every process the job starts

    def run(self, *argv: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()
        return out or "GONE"


def _pid(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return int(path.read_text().split()[0])


@pytest.fixture(scope="module")
def slurm(reference: tuple[Any, dict[str, bytes], float]) -> Iterator[Slurm]:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        msg = f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        if IN_CI:
            pytest.fail(msg + "; CI=true, so this is an error", pytrace=False)
        pytest.skip(msg)
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm runs its daemons as root here")
    setup = reference[0]
    root = Path(tempfile.mkdtemp(prefix="aser-slurm-", dir="/tmp"))  # short: socket paths
    for d in ("state", "spool", "munge"):
        (root / d).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    # The chaos reference ran on a local Ray of cpu_count + 1 logical CPUs: the same here (the
    # resolved workers decide the bytes); config_overrides lets slurmd advertise them.
    cpus = (os.cpu_count() or 1) + 1
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=asertest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        # cgroup process tracking, as production clusters run it: Ray workers orphaned when
        # their raylet ends (a cancelled job) are still the job's, and Slurm ends them.
        "ProctrackType=proctrack/cgroup", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides", "ReturnToService=2",
        "MpiDefault=none", "SwitchType=switch/none", "KillWait=30",  # Slurm's default
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n")
    env = {**os.environ, **setup.env, "AWS_ENDPOINT_URL": setup.endpoint, "SLURM_CONF": str(conf),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    pids: list[int] = []
    s = Slurm(root, env, cpus, [])
    try:
        subprocess.run(["munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--log-file={root}/munge/log",
                        f"--pid-file={root}/munge/pid", f"--seed-file={root}/munge/seed"], check=True, env=env,
                       capture_output=True, timeout=30)
        pids.append(_pid(root / "munge" / "pid"))
        subprocess.run(["slurmctld", "-i"], check=True, env=env, capture_output=True, timeout=30)
        pids.append(_pid(root / "slurmctld.pid"))
        subprocess.run(["slurmd"], check=True, env=env, capture_output=True, timeout=30)
        pids.append(_pid(root / "slurmd.pid"))
        deadline = time.monotonic() + 60
        while "idle" not in s.run("sinfo", "-h", "-o", "%T").stdout:
            assert time.monotonic() < deadline, (root / "slurmd.log").read_text()[-2000:]
            time.sleep(0.5)
        yield s
    finally:
        subprocess.run(["scancel", "--full", "-p", "test"], env=env, capture_output=True, timeout=30)
        time.sleep(1)
        left = [pid for m in s.markers for pid in run_pids(m)]
        for pid in [*left, *reversed(pids)]:  # the jobs' processes, then the daemons
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def recipe(reference: tuple[Any, dict[str, bytes], float], tmp_path_factory: pytest.TempPathFactory) -> str:
    setup = reference[0]
    path = tmp_path_factory.mktemp("slurm-recipe") / "stories.yaml"
    path.write_text(yaml.safe_dump({"calib": {"num_samples": setup.num_samples, "seq_len": setup.seq_len},
                                    "method": {"rank": setup.rank}}))
    return str(path)


def submit(slurm: Slurm, setup: Any, dest: str, recipe: str, workers: int) -> tuple[str, str]:
    """The script as its header documents it for CPU nodes, with this test's values: (job id,
    the marker its processes carry)."""
    marker = uuid.uuid4().hex
    slurm.markers.append(marker)
    ports = " ".join(f"--{flag} {_free_port()}" for flag in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port"))
    env = {**slurm.env, "SOURCE": setup.source, "DEST": dest, "RECIPE": recipe, "CALIB": setup.calib,
           "ASER_VENV": sys.prefix, "GPUS_PER_NODE": "0", "RAY_PORT": str(_free_port()),
           "WORKERS": str(workers), "RAY_HEAD_ARGS": ports, MARKER: marker}
    out = slurm.run("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={slurm.cpus}",
                    "--time=30", f"--output={slurm.root}/job-%j.out", f"--chdir={REPO}", str(SBATCH), env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], marker


def wait_gone(slurm: Slurm, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := slurm.state(job_id)) != "GONE":
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(1)
    return (slurm.root / f"job-{job_id}.out").read_text(errors="replace")


def left_behind(marker: str, grace: float = 10) -> list[str]:
    """The job's processes still running once it is gone (its Ray's GCS, raylet, workers...),
    after a short grace for those already exiting."""
    deadline = time.monotonic() + grace
    while (pids := run_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            for p in pids if Path(f"/proc/{p}").exists()]


def reference_run(ref_dest: str = "s3://aser-chaos/ref") -> tuple[int, int]:
    """(workers, stages) of the chaos harness's reference run, from its manifest."""
    mf = json.loads(storage.read_text(storage.join(ref_dest, "aser_manifest.json")))
    return int(mf["config"]["workers"]["num_workers"]), len(mf["layers"])


def test_sbatch_quantizes_and_stops_its_ray(slurm: Slurm, reference: tuple[Any, dict[str, bytes], float],
                                            recipe: str) -> None:
    setup, ref, _ = reference
    dest = "s3://aser-chaos/slurm"
    t0 = time.perf_counter()
    job, marker = submit(slurm, setup, dest, recipe, reference_run()[0])
    log = wait_gone(slurm, job, RUN_TIMEOUT_S)
    print(f"Slurm job wall time (sbatch to gone): {time.perf_counter() - t0:.1f} s")
    assert "[aser.sbatch] Ray stopped on 1 node(s)" in log, log[-3000:]
    summary = json.loads([ln for ln in log.splitlines() if ln.startswith("{")][-1])  # --json
    assert summary["status"] == "complete", log[-3000:]
    assert dest_files(dest) == ref
    assert left_behind(marker) == []


def cancel_mid_run(slurm: Slurm, setup: Any, dest: str, recipe: str, workers: int, stages: int,
                   scancel: list[str]) -> tuple[str, str]:
    """Submit, cancel with ``scancel`` once the run is under way; (job log, marker) once the job
    is gone. A fresh DEST: once a stage is recorded. A DEST an earlier job left part done: once
    the driver says it resumes (Ray up, the layers about to start), not once a further stage is
    recorded: the few stages left then ran to the end before scancel reached them once in CI."""
    job, marker = submit(slurm, setup, dest, recipe, workers)
    job_log = slurm.root / f"job-{job}.out"
    resumed = dest in before_job

    def under_way() -> bool:
        if resumed:
            return job_log.exists() and "[aser] resuming " in job_log.read_text(errors="replace")
        return done_stages(dest) >= 1

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not under_way():
        assert time.monotonic() < deadline and slurm.state(job) != "GONE", \
            job_log.read_text(errors="replace")[-3000:] if job_log.exists() else f"job {job}: no log"
        time.sleep(0.1)
    assert slurm.run(*scancel, job).returncode == 0
    log = wait_gone(slurm, job, 120)
    assert done_stages(dest) < stages, "the run ended before scancel reached it"
    before_job[dest] = done_stages(dest)
    return log, marker


before_job: dict[str, int] = {}  # stages recorded when the previous job on a DEST ended


def test_scancel_stops_driver_and_ray_and_resubmit_resumes(
        slurm: Slurm, reference: tuple[Any, dict[str, bytes], float], recipe: str) -> None:
    """`scancel --batch --signal=TERM` (the trap's order: the driver, which releases DEST's
    lease, then Ray), then a plain `scancel` (Slurm signals every process at once), then the
    same submission again: it resumes and ends byte-identical."""
    setup, ref, _ = reference
    dest = "s3://aser-chaos/slurm-cancelled"
    workers, stages = reference_run()

    log, marker = cancel_mid_run(slurm, setup, dest, recipe, workers, stages, ["scancel", "--batch", "--signal=TERM"])
    assert "[aser.sbatch] stopping (exit status 143)" in log and "Ray stopped on 1 node(s)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert left_behind(marker) == []
    assert lease.current(dest) is None  # the driver released DEST before Ray stopped

    log, marker = cancel_mid_run(slurm, setup, dest, recipe, workers, stages, ["scancel"])
    # The trap still ends Ray in time (within Slurm's KillWait) ...
    assert "[aser.sbatch] stopping" in log and "Ray stopped on 1 node(s)" in log, log[-3000:]
    assert left_behind(marker) == []  # proctrack/cgroup: Ray's orphaned workers ended too
    # The driver's lease may be left (Ray can end the driver first); it names a dead process
    # of this machine, so the next job takes it over at once (on another node: --wait).

    again, marker = submit(slurm, setup, dest, recipe, workers)
    log = wait_gone(slurm, again, RUN_TIMEOUT_S)
    assert f"resuming {dest}: " in log, log[-3000:]
    assert dest_files(dest) == ref
    assert left_behind(marker) == []
    assert lease.current(dest) is None
