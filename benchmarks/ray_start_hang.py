"""The chaos trial that hung, repeated: SIGKILL the first Ray worker process of a run as soon as it
appears (Ray is still starting), and see how the run ends. JSON on stdout.

    ASER_RAY_START_TIMEOUT_S=25 python benchmarks/ray_start_hang.py [--tries 6] [--wait 60] [--dump]

The model and S3 setup are benchmarks/chaos.py's. Each try reports the driver's exit status, its
wall time, the last line of its output, and the run's processes still alive 2 s after the driver
ended. A run not ended after --wait seconds counts as hung (with --dump, py-spy dumps the stack of
each of its Python processes to stderr first), then is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos import s3_on_moto  # noqa: E402
from chaos_harness import Setup, _name, finish, ray_worker_pids, run_pids, start, upload  # noqa: E402
from synthetic_llama import write_random_llama  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tries", type=int, default=6)
    p.add_argument("--wait", type=float, default=60, help="seconds after the kill before a run counts as hung")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dump", action="store_true", help="py-spy dump a hung run's Python processes")
    p.add_argument("--data", default=os.environ.get("ASER_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    a = p.parse_args()
    moto, endpoint, creds = s3_on_moto()
    rng = random.Random(a.seed)
    tries = []
    try:
        data = Path(a.data)
        with tempfile.TemporaryDirectory() as tmp:
            upload(write_random_llama(Path(tmp) / "m", data / "stories260K", 16, 256, 1024, 8), "s3://chaos/src")
        setup = Setup(endpoint, "s3://chaos/src", str(data / "tinystories" / "sample.txt"), env=creds,
                      num_samples=32, seq_len=128)
        for k in range(a.tries):
            run = start(setup, f"s3://chaos/hang-{k}")
            workers: list[int] = []
            while run.proc.poll() is None and not workers:
                workers = ray_worker_pids(run.marker)
                time.sleep(0.05)
            victim = None
            if workers:
                pid = rng.choice(workers)
                victim = {"name": _name(pid), "killed_at_s": time.perf_counter() - run.t0}
                os.kill(pid, signal.SIGKILL)
            deadline = time.perf_counter() + a.wait
            while run.proc.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.5)
            hung = run.proc.poll() is None
            if hung and a.dump:
                for pid in sorted(run_pids(run.marker)):
                    dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True)
                    sys.stderr.write(dump.stdout[-4000:])
            left = []
            if not hung:
                time.sleep(2)
                left = [_name(pid) for pid in run_pids(run.marker)]
            rc, wall = finish(run, 1 if hung else 30)
            trial = {"victim": victim, "hung": hung, "rc": rc, "wall_s": wall, "left_alive": left,
                     "last_line": (run.stderr().strip().splitlines() or [""])[-1]}
            tries.append(trial)
            print(f"try {k}: {json.dumps(trial)}", file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    print(json.dumps({"ray_start_timeout_s": os.environ.get("ASER_RAY_START_TIMEOUT_S", "300"), "tries": tries,
                      "stopped": sum(1 for t in tries if t["rc"] not in (0, -1) and not t["hung"]),
                      "completed": sum(1 for t in tries if t["rc"] == 0),
                      "hung": sum(1 for t in tries if t["hung"])}, indent=1))


if __name__ == "__main__":
    main()
