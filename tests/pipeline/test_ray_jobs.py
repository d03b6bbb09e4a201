"""`aser quantize` submitted as a Ray job, for real: a Ray head on 127.0.0.1 with its dashboard
(the job API) and token authentication, the README's `ray job submit` line with this test's
source, DEST and recipe put in, stories260K from S3 (moto on loopback) to S3. A job stopped with
`ray job stop` mid-run and submitted again resumes. Outputs are compared byte for byte with the
chaos harness's uninterrupted run of the same checkpoint and config, and loaded with
transformers + PEFT."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aser.checkpoint import storage
from aser.pipeline import manifest
from chaos_harness import MARKER, RUN_TIMEOUT_S, dest_files, done_stages, run_pids, upload

pytestmark = [pytest.mark.timeout(900), pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Head:
    def __init__(self, env: dict[str, str], dashboard: int) -> None:
        self.env = env
        self.address = f"http://127.0.0.1:{dashboard}"

    def job(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAY, "job", *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def status(self, job_id: str) -> str:
        out = self.job("status", "--address", self.address, job_id)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
        m = re.search(r"Status for job '[^']+': (\w+)", text)  # a job still running
        if m:
            return m.group(1)
        m = re.search(r"Job '[^']+' (succeeded|failed|was stopped|stopped)", text)  # a finished one
        if m:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED"}.get(m.group(1), "STOPPED")
        return f"? {text[-300:]}"

    def wait_ready(self, ray_dir: Path, timeout: float = 90) -> None:
        """Until a job can be submitted and runs: the job API answers `ray job list` before the
        head's job agent has registered, and a submission before that fails."""
        deadline = time.monotonic() + timeout
        while True:
            job_id = f"probe-{uuid.uuid4().hex[:8]}"
            probe = self.job("submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                             "--", "python", "-c", "pass")
            if probe.returncode == 0:
                self.wait(job_id, {"SUCCEEDED"}, deadline - time.monotonic())
                return
            if time.monotonic() > deadline:
                agent_log = next(ray_dir.glob("session_*/logs/dashboard_agent.log"), None)
                raise AssertionError(f"no job could be submitted in {timeout} s: {probe.stderr[-1500:]}\n"
                                     f"dashboard_agent.log: {agent_log.read_text()[-1500:] if agent_log else '-'}")
            time.sleep(2)

    def wait(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(job_id)
            if s in states:
                return s
            time.sleep(2)
        raise AssertionError(f"job {job_id} still {self.status(job_id)} after {timeout} s")


@pytest.fixture(scope="module")
def head(reference: tuple[Any, dict[str, bytes], float]) -> Iterator[Head]:
    """`ray start --head` on 127.0.0.1 with the dashboard and RAY_AUTH_MODE=token; every process it
    starts carries a marker, and only those are killed at teardown (no `ray stop`: it would stop
    every Ray of this user on the machine)."""
    setup = reference[0]
    marker = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="aser-rj-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **setup.env, "AWS_ENDPOINT_URL": setup.endpoint, MARKER: marker,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    # The CPUs `aser quantize` gives the local Ray it starts (driver._init_ray): the same
    # resolved workers, hence the same bytes, as the reference run.
    cpus = (os.cpu_count() or 1) + 1
    # Every port Ray would otherwise take at a fixed default gets a free one: a job agent that
    # finds 52365 taken (by any other Ray on the machine, such as a killed run's leftovers) never
    # registers, and every submission then fails with "No available agent to submit job".
    ports = [arg for flag in ("--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                              "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
             for arg in (flag, str(_free_port()))]
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", *ports,
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--num-cpus", str(cpus), "--temp-dir", tmp, "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    h = Head(env, dashboard)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        h.wait_ready(Path(tmp))
        yield h
    finally:
        for _ in range(3):
            for pid in run_pids(marker):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(tmp, ignore_errors=True)


def readme_submit_line() -> list[str]:
    """The `ray job submit ... -- aser quantize ...` command of the README's "Running on a
    cluster" section, as argv."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("ray job submit"):
                return shlex.split(line.split("#", 1)[0])
    raise AssertionError("no `ray job submit` line in the README's Running on a cluster section")


def submit_argv(head: Head, source: str, dest: str, recipe: str, job_id: str) -> list[str]:
    """The README's line with this test's values put in (and a submission id, to follow it)."""
    argv = readme_submit_line()
    sep = argv.index("--")
    ray_part, aser_part = argv[:sep], argv[sep + 1:]
    assert ray_part[:3] == ["ray", "job", "submit"] and aser_part[:2] == ["aser", "quantize"], argv
    out = [RAY, "job", "submit", "--submission-id", job_id, "--no-wait"]
    it = iter(ray_part[3:])
    for a in it:
        value = next(it)
        out += [a, {"--address": head.address, "--working-dir": str(REPO)}.get(a, value)]
    flags = aser_part[4:]
    assert "--recipe" in flags, aser_part
    flags[flags.index("--recipe") + 1] = recipe
    return [*out, "--", "aser", "quantize", source, dest, *flags]


@pytest.fixture(scope="module")
def recipe(reference: tuple[Any, dict[str, bytes], float], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The recipe equal to the chaos harness's flags, so the output equals its reference run."""
    setup = reference[0]
    path = tmp_path_factory.mktemp("recipe") / "stories.yaml"
    path.write_text(yaml.safe_dump({"calib": {"source": setup.calib, "num_samples": setup.num_samples,
                                              "seq_len": setup.seq_len}, "method": {"rank": setup.rank}}))
    return str(path)


def _load_with_peft(dest: str, tmp: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    fs, root = storage.resolve(dest)
    fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
    # As the DEST's model card says for the default (pack-quantized) format: transformers keeps
    # packed weights packed, and PEFT wraps a Linear's `weight` ("'Linear' object has no attribute
    # 'weight'" without it).
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp), dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    model = PeftModel.from_pretrained(model, str(tmp / "aser_adapter")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_job_api_refuses_a_client_without_the_token(head: Head) -> None:
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token either
    out = head.job("list", "--address", head.address, env=env)
    assert out.returncode != 0 and "auth" in (out.stdout + out.stderr).lower(), out


def test_submitted_job_succeeds_and_equals_the_reference(
        head: Head, reference: tuple[Any, dict[str, bytes], float], recipe: str, tmp_path: Path) -> None:
    setup, ref, _ = reference
    dest = "s3://aser-chaos/ray-job"
    t0 = time.perf_counter()
    sub = subprocess.run(submit_argv(head, setup.source, dest, recipe, "aser-ok"), env=head.env,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr[-3000:]
    state = head.wait("aser-ok", {"SUCCEEDED", "FAILED", "STOPPED"}, RUN_TIMEOUT_S)
    logs = head.job("logs", "--address", head.address, "aser-ok").stdout
    assert state == "SUCCEEDED", logs[-3000:]
    print(f"Ray job wall time (submit to SUCCEEDED): {time.perf_counter() - t0:.1f} s")
    summary = json.loads(logs.strip().splitlines()[-1])  # --json: the run summary on stdout
    assert summary["status"] == "complete" and summary["dest"] == dest
    assert "starting a local Ray" not in logs  # it joined the job's cluster (RAY_ADDRESS)
    assert dest_files(dest) == ref
    _load_with_peft(dest, tmp_path / "dest")


def test_stopped_job_resubmitted_resumes(head: Head, reference: tuple[Any, dict[str, bytes], float], recipe: str,
                                         stories_dir: Path, tmp_path: Path) -> None:
    """A model deep enough (16 layers, width 256) that `ray job stop` lands mid-run; the stopped
    and resubmitted job ends byte-identical to an uninterrupted job of the same model."""
    from pipeline_run_helpers import write_synthetic_llama

    setup = reference[0]
    source = "s3://aser-chaos/ray-job-deep/src"
    upload(write_synthetic_llama(tmp_path / "deep", stories_dir, num_layers=16, hidden=256), source)

    def job(dest: str, job_id: str) -> None:
        argv = submit_argv(head, source, dest, recipe, job_id)
        assert subprocess.run(argv, env=head.env, capture_output=True, text=True, timeout=120).returncode == 0

    def logs(job_id: str) -> str:
        return head.job("logs", "--address", head.address, job_id).stdout[-3000:]

    job("s3://aser-chaos/ray-job-deep/whole", "aser-whole")
    assert head.wait("aser-whole", {"SUCCEEDED", "FAILED", "STOPPED"}, RUN_TIMEOUT_S) == "SUCCEEDED", logs("aser-whole")
    dest = "s3://aser-chaos/ray-job-deep/stopped"
    job(dest, "aser-stop")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while done_stages(dest) < 2:  # the embedding copy and layer 0 of 18 stages
        assert head.status("aser-stop") in ("PENDING", "RUNNING"), logs("aser-stop")
        assert time.monotonic() < deadline
        time.sleep(0.5)
    stop = head.job("stop", "--address", head.address, "aser-stop")
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert head.wait("aser-stop", {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
    stopped_at = done_stages(dest)
    print(f"stopped after {stopped_at} of 18 stages")
    assert not manifest.is_finished(dest)
    time.sleep(3)
    assert done_stages(dest) == stopped_at  # nothing of the stopped job writes on

    job(dest, "aser-resumed")
    assert head.wait("aser-resumed", {"SUCCEEDED", "FAILED", "STOPPED"}, RUN_TIMEOUT_S) == "SUCCEEDED", logs("aser-resumed")
    starts = manifest.load_manifest(dest).summary["starts"]
    assert starts[0]["start"] == 0 and starts[-1]["start"] >= stopped_at - 1 > 0, starts  # resumed, not restarted
    assert dest_files(dest) == dest_files("s3://aser-chaos/ray-job-deep/whole")
