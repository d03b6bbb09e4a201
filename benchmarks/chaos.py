"""Chaos trials of `aser quantize` (tests/pipeline/chaos_harness.py) at length; JSON on stdout.

    python benchmarks/chaos.py [--seed 0] [--driver-kills 8] [--worker-kills 4] [--fault-runs 3]

Starts a moto S3 server on 127.0.0.1, uploads a random-weight Llama (16 layers of width 256 with
stories260K's tokenizer, from ../shared/data; --layers, --hidden), runs `aser quantize`
S3 -> S3 once uninterrupted (the reference bytes and the wall time T), then:

- driver kills: the driver and its local Ray SIGKILLed at u * T, u ~ U(0, 1) from the seed,
  then the same command rerun until it completes;
- worker kills: one Ray worker process of the run, drawn at random, SIGKILLed at u * T;
- storage faults: the run's S3 traffic through tests/fault_proxy.py at the rates printed;
- node losses: a 3-node ray.cluster_utils.Cluster loses the worker node holding a calibration
  actor once a drawn number of stages is recorded (tests/pipeline/node_loss_run.py).

Each trial reports whether it completed byte-identical to the reference, the clear error of any
attempt that stopped, and the work redone (the rerun's wall time against T).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))
sys.path.insert(0, str(ROOT / "tests"))

from chaos_harness import (  # noqa: E402
    Setup, dest_files, driver_kill, finish, node_loss, start, storage_faults, upload, worker_kill,
)
from fault_proxy import FaultProxy, Faults  # noqa: E402
from synthetic_llama import write_random_llama  # noqa: E402

FAULT_RATES = {"error": 0.05, "reset": 0.03, "stall": 0.03, "truncate": 0.03}


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def s3_on_moto() -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """A moto S3 server on loopback, this process's environment pointed at it with test
    credentials (children inherit them), its ``chaos`` bucket made: (server, endpoint, creds)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    moto, endpoint = _moto()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import s3fs

    s3fs.S3FileSystem().mkdir("chaos")
    return moto, endpoint, creds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--driver-kills", type=int, default=8)
    p.add_argument("--worker-kills", type=int, default=4)
    p.add_argument("--fault-runs", type=int, default=3)
    p.add_argument("--node-losses", type=int, default=2)
    p.add_argument("--data", default=os.environ.get("ASER_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    moto, endpoint, creds = s3_on_moto()
    rng = random.Random(a.seed)
    out: dict = {"seed": a.seed, "fault_rates": FAULT_RATES, "trials": []}
    try:
        data = Path(a.data)
        with tempfile.TemporaryDirectory() as tmp:
            # Enough layers that the layer loop, not start-up, is most of a run.
            model = write_random_llama(Path(tmp) / "m", data / "stories260K", a.layers, a.hidden, 4 * a.hidden, 8)
            upload(model, "s3://chaos/src")
        out["model"] = {"layers": a.layers, "hidden": a.hidden, "intermediate": 4 * a.hidden}
        setup = Setup(endpoint, "s3://chaos/src", str(data / "tinystories" / "sample.txt"), env=creds,
                      num_samples=a.num_samples, seq_len=a.seq_len)
        run = start(setup, "s3://chaos/ref")
        rc, wall = finish(run, a.timeout)
        if rc != 0:
            raise SystemExit(f"the reference run failed:\n{run.stderr()[-3000:]}")
        ref = dest_files("s3://chaos/ref")
        out["reference_wall_s"] = wall
        print(f"reference run: {wall:.1f} s", file=sys.stderr)
        plan = ([("driver_kill", i) for i in range(a.driver_kills)] + [("worker_kill", i) for i in range(a.worker_kills)]
                + [("storage_faults", i) for i in range(a.fault_runs)] + [("node_loss", i) for i in range(a.node_losses)])
        for kind, i in plan:
            dest = f"s3://chaos/{kind}-{i}"
            if kind == "driver_kill":
                trial = driver_kill(setup, dest, rng.uniform(0, wall), a.timeout)
            elif kind == "worker_kill":
                trial = worker_kill(setup, dest, rng.uniform(0, wall), rng, a.timeout)
            elif kind == "node_loss":
                trial = node_loss(setup, dest, rng.randrange(1, a.layers + 1), a.timeout)
            else:
                faults = Faults(rates=FAULT_RATES, seed=rng.randrange(1 << 30), stall_s=0.3)
                with FaultProxy(endpoint, faults) as proxy:
                    trial = storage_faults(setup, dest, proxy, a.timeout)
                trial["faults"] = dict(faults.counts)
            trial["identical"] = trial["completed"] and dest_files(dest) == ref
            redo = [t["wall_s"] for t in trial.get("attempts", [])]
            trial["rerun_s"] = sum(redo)
            out["trials"].append(trial)
            print(f"{kind} {i}: completed={trial['completed']} identical={trial['identical']} "
                  f"rerun {trial['rerun_s']:.1f} s {trial.get('victim') or ''} {trial.get('faults') or ''}",
                  file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    summary = {}
    for kind in ("driver_kill", "worker_kill", "storage_faults", "node_loss"):
        ts = [t for t in out["trials"] if t["kind"] == kind]
        if ts:
            errors = [t2["error"] for t in ts for t2 in ([t.get("first_run")] if t.get("first_run") else []) + t.get("attempts", [])
                      if t2 and t2.get("error")]
            summary[kind] = {"trials": len(ts), "completed_identical": sum(t["identical"] for t in ts),
                             "stopped_with_clear_error": sum(1 for e in errors if e.startswith("aser: error: ")),
                             "stopped_otherwise": sum(1 for e in errors if not e.startswith("aser: error: ")),
                             "max_rerun_s": max(t["rerun_s"] for t in ts)}
    out["summary"] = summary
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
