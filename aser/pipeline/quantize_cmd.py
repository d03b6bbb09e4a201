"""`aser quantize SOURCE DEST`: flags (or a YAML recipe) -> RunConfig -> the driver.

Every flag given on the command line overrides the recipe, even one equal to its default
(``--workers 1`` beats a recipe's ``num_workers: 4``); a flag not given leaves the recipe's value
(so a recipe's ``rank: 64`` survives a command line without ``--rank``). No flag has an argparse
default: an absent flag is absent from the namespace, and RunConfig's dataclass defaults fill
whatever neither the recipe nor a flag sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from aser.pipeline.flags import add_method_flags, given_format, given_method_fields
from aser.pipeline.lease import DEFAULT_TTL_S
from aser.pipeline.sources import DEFAULT_SOURCE

DEFAULT_DEST = "./aser-out/smollm2-135m-w4a8"
# `aser quantize` with neither a source nor calibration settings: the README's first command, on
# the embedded model with calibration sampled from itself. Sampling and calibrating on the full
# default (128 x 512 tokens) is many minutes on a small machine; the first run uses this much
# instead and says what it costs (measured by benchmarks/first_run.py).
FIRST_RUN_CALIB = {"num_samples": 64, "seq_len": 128}
FIRST_RUN_NOTE = (
    "[aser] first run on the embedded model: {num_samples} x {seq_len} calibration tokens sampled from it "
    "instead of 128 x 512 ({cost}); pass --num-samples 128 --seq-len 512 for the full default, or "
    "--calib TEXT for your own text"
)
FIRST_RUN_COST = ("measured on this model: WikiText-2 test perplexity 35.84 against 35.89 with 128 x 512; "
                  "benchmarks/results/first_run.json")
# Test hooks (crash the driver at a point, or one worker mid-layer); read here, where the
# environment may be read, and passed to the driver as arguments.
KILL_AFTER_ENV = "ASER_TEST_KILL_AFTER"
KILL_WORKER_ENV = "ASER_TEST_KILL_WORKER"

# Flag dest -> RunConfig path; method flags map onto method.<name> (flags.METHOD_FLAGS).
_RUN_FLAGS = {
    "source": ("source",),
    "dest": ("dest",),
    "calib": ("calib", "source"),
    "num_samples": ("calib", "num_samples"),
    "seq_len": ("calib", "seq_len"),
    "seed": ("calib", "seed"),
    "workers": ("workers", "num_workers"),
    "cpus_per_worker": ("workers", "num_cpus_per_worker"),
    "gpus_per_worker": ("workers", "num_gpus_per_worker"),
    "reconstruct_gpus": ("workers", "reconstruct_gpus"),
    "reconstruct_cpus": ("workers", "reconstruct_cpus"),
    "propagate": ("propagate",),
    "address": ("ray_address",),
    "shard_size": ("shard_size_bytes",),
    "save_state_every": ("save_state_every",),
}


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quantize`` on the ``aser`` parser's subparsers; sets ``func``."""
    from aser.pipeline.config import PROPAGATE_MODES

    # argument_default=SUPPRESS: a flag not given is absent from the namespace (see above).
    q = subparsers.add_parser(
        "quantize", help="quantize a checkpoint on Ray, layer by layer, from and to any storage URL",
        argument_default=argparse.SUPPRESS,
    )
    q.add_argument("source", nargs="?", help=f"checkpoint URL (default {DEFAULT_SOURCE})")
    q.add_argument("dest", nargs="?", help=f"output URL (default {DEFAULT_DEST})")
    add_method_flags(q)
    q.add_argument("--recipe", default=None, help="YAML recipe (RunConfig fields); flags given override it")
    q.add_argument("--calib", help="calibration text URL; default: sampled from the model")
    q.add_argument("--num-samples", type=int)
    q.add_argument("--seq-len", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--workers", type=int,
                   help="calibration workers (Ray actors); default: one per GPU of the cluster, else 1")
    q.add_argument("--cpus-per-worker", type=float)
    q.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per calibration worker; default: 0.5 on a cluster with GPUs, else 0")
    q.add_argument("--reconstruct-gpus", type=float,
                   help="GPUs per reconstruction task (a fraction shares a GPU); default: 0.25 with GPUs, else 0")
    q.add_argument("--reconstruct-cpus", type=int,
                   help="CPUs (torch threads) per reconstruction task; default 1. Recorded: a resume must match")
    q.add_argument("--propagate", choices=PROPAGATE_MODES)
    q.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    q.add_argument("--shard-size", type=int, help="max bytes per output shard")
    q.add_argument("--save-state-every", type=int,
                   help="save the workers' states every N layers (resume points); default: when the "
                        "forward work since the last save outweighs its cost")
    q.add_argument("--wait", action="store_true", default=False,
                   help="if another live run holds DEST's lease, wait for it instead of exiting")
    q.add_argument("--lease-ttl", type=float, default=DEFAULT_TTL_S, metavar="SECONDS",
                   help="DEST's lease expires this long after its holder's last heartbeat (a heartbeat "
                        f"every quarter of it); another machine's run waits that long after a crash (default {DEFAULT_TTL_S:.0f})")
    q.add_argument("--no-progress", action="store_true", default=False)
    q.add_argument("--json", action="store_true", default=False, help="print the run summary as JSON on stdout")
    q.set_defaults(func=cmd_quantize)
    return q


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            from aser.pipeline.config import ConfigError

            raise ConfigError(f"{part} must be a mapping, got {node!r}")
    node[path[-1]] = value


def is_first_run(a: argparse.Namespace) -> bool:
    """No source, no recipe and no calibration setting: the README's first command."""
    return not a.recipe and not any(hasattr(a, f) for f in ("source", "calib", "num_samples", "seq_len"))


def config_from_args(a: argparse.Namespace) -> Any:
    """The RunConfig of the command line: the recipe (if any), then every flag given (the first
    run's smaller calibration when none is: ``FIRST_RUN_CALIB``)."""
    from aser.pipeline.config import RunConfig, read_recipe

    data = read_recipe(a.recipe) if a.recipe else {}
    if is_first_run(a):
        data["calib"] = dict(FIRST_RUN_CALIB)
    for flag, path in _RUN_FLAGS.items():
        if hasattr(a, flag):
            _set(data, path, getattr(a, flag))
    for name, value in given_method_fields(a).items():
        _set(data, ("method", name), value)
    if given_format(a) is not None:
        data["format"] = given_format(a)
    data.setdefault("source", DEFAULT_SOURCE)
    data.setdefault("dest", DEFAULT_DEST)
    return RunConfig.from_dict(data)


def cmd_quantize(a: argparse.Namespace) -> int:
    from aser.pipeline import driver

    config = config_from_args(a)
    if is_first_run(a):
        print(FIRST_RUN_NOTE.format(cost=FIRST_RUN_COST, **FIRST_RUN_CALIB), file=sys.stderr)
    kill_worker = None
    if os.environ.get(KILL_WORKER_ENV):
        rank, layer = os.environ[KILL_WORKER_ENV].split(":")
        kill_worker = (int(rank), int(layer))
    result = driver.run(
        config, show_progress=not a.no_progress, kill_after=os.environ.get(KILL_AFTER_ENV) or None,
        kill_worker=kill_worker, wait=a.wait, lease_ttl_s=a.lease_ttl,
    )
    if a.json:
        print(json.dumps({"dest": result.dest, "status": result.status, "wall_s": result.wall_s,
                          "summary": result.manifest.summary}))
    else:
        print(driver.summary_table(result.manifest), file=sys.stderr)
        print(f"{result.status}: {result.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aser.pipeline.quantize_cmd ...`` until the subcommand is wired into cli.py."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="aser")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_quantize_parser(sub)
    a = p.parse_args(argv)
    try:
        return int(a.func(a))
    except ValueError as e:
        print(f"aser: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
