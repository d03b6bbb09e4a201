"""A run that loses a node: ``python node_loss_run.py AFTER_STAGES quantize SOURCE DEST [flags]``.

Starts a 3-node ``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head without CPUs and two workers
of 4 logical CPUs), runs ``driver.run`` with the config the `aser quantize` flags give, and removes the
last worker node as soon as DEST's manifest records AFTER_STAGES finished stages (never, if
negative): mid-run whatever the machine's speed. Prints one JSON line: the status or the error,
the wall time, the driver's recoveries, when the node went and how many stages were done. A
separate process because a driver connects to one cluster only (the tests' own is connected).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from aser.pipeline import driver, manifest
from aser.pipeline.cli import build_parser
from aser.pipeline.quantize_cmd import config_from_args


def main() -> None:
    after_stages = int(sys.argv[1])
    config = config_from_args(build_parser().parse_args(sys.argv[2:]))
    # No CPU on the head: every actor and task runs on a worker node, so the one removed holds
    # work; each worker node alone can run the whole job (logical CPUs, oversubscribed).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=4) for _ in range(2)]
    ray.init(address=cluster.address)
    out: dict = {}
    t0 = time.perf_counter()

    def remove() -> None:
        while True:
            try:
                mf = manifest.load_manifest(config.dest)
            except (OSError, ValueError):
                mf = None
            if mf is not None and len(mf.layers) >= after_stages:
                break
            time.sleep(0.05)
        # The node of a calibration actor if one is on a worker node: the loss then costs work.
        from ray.util.state import list_actors

        busy = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                if "CalibrationWorker" in (a.class_name or "")}
        victim = next((n for n in nodes if n.node_id in busy), nodes[-1])
        out.update(removed_at_s=time.perf_counter() - t0, stages_done_at_removal=len(mf.layers),
                   removed_node_had_a_calibration_actor=victim.node_id in busy)
        cluster.remove_node(victim)

    if after_stages >= 0:
        threading.Thread(target=remove, daemon=True).start()
    try:
        res = driver.run(config, show_progress=False)
        out.update(status=res.status, recoveries=res.manifest.summary.get("recoveries", []))
    except ValueError as e:
        out.update(status="error", error=str(e))
    out["wall_s"] = time.perf_counter() - t0
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
