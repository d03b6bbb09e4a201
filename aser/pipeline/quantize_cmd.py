"""`aser quantize SOURCE DEST`: flags (or a YAML recipe) -> RunConfig -> the driver.

Flags given on the command line override the recipe; flags left at their defaults do not (so a
recipe's ``rank: 64`` survives a command line without ``--rank``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from aser.pipeline.cli import add_method_flags, method_from_args

DEFAULT_SOURCE = "builtin:smollm2-135m"
DEFAULT_DEST = "./aser-out/smollm2-135m-w4a8"
# Test hooks (crash the driver at a point, or one worker mid-layer); read here, where the
# environment may be read, and passed to the driver as arguments.
KILL_AFTER_ENV = "ASER_TEST_KILL_AFTER"
KILL_WORKER_ENV = "ASER_TEST_KILL_WORKER"

# Flag dest -> RunConfig path; method flags map onto method.<name>.
_RUN_FLAGS = {
    "calib": ("calib", "source"),
    "num_samples": ("calib", "num_samples"),
    "seq_len": ("calib", "seq_len"),
    "seed": ("calib", "seed"),
    "workers": ("workers", "num_workers"),
    "cpus_per_worker": ("workers", "num_cpus_per_worker"),
    "gpus_per_worker": ("workers", "num_gpus_per_worker"),
    "propagate": ("propagate",),
    "address": ("ray_address",),
    "shard_size": ("shard_size_bytes",),
}
_METHOD_FLAGS = (
    "method", "rank", "w_bits", "a_bits", "group_size", "alpha", "num_outliers", "outlier_mode",
    "reserve_rank", "smooth_channels", "alpha_grid", "outlier_grid", "damp", "svd", "rank_energy",
)


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quantize`` on the ``aser`` parser's subparsers; sets ``func``."""
    q = subparsers.add_parser(
        "quantize", help="quantize a checkpoint on Ray, layer by layer, from and to any storage URL"
    )
    q.add_argument("source", nargs="?", default=DEFAULT_SOURCE, help=f"checkpoint URL (default {DEFAULT_SOURCE})")
    q.add_argument("dest", nargs="?", default=DEFAULT_DEST, help=f"output URL (default {DEFAULT_DEST})")
    add_method_flags(q)
    q.add_argument("--recipe", default=None, help="YAML recipe (RunConfig fields); flags given override it")
    q.add_argument("--calib", default=None, help="calibration text URL; default: sampled from the model")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=1, help="calibration workers (Ray actors)")
    q.add_argument("--cpus-per-worker", type=float, default=1.0)
    q.add_argument("--gpus-per-worker", type=float, default=0.0)
    q.add_argument("--propagate", default="fp", choices=("fp", "quantized"))
    q.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    q.add_argument("--shard-size", type=int, default=None, help="max bytes per output shard")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    q.set_defaults(func=cmd_quantize, _quantize_parser=q)
    return q


def _given(parser: argparse.ArgumentParser, a: argparse.Namespace, name: str) -> bool:
    return getattr(a, name) != parser.get_default(name)


def config_from_args(a: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The RunConfig of the command line: the recipe (if any), then the flags given."""
    from aser.pipeline.config import RunConfig

    data: dict[str, Any] = {}
    if a.recipe:
        from aser.pipeline import storage

        import yaml

        loaded = yaml.safe_load(storage.read_text(a.recipe)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {storage.redact(a.recipe)} must be a mapping at the top level")
        data = loaded
    data = json.loads(json.dumps(data))  # a deep, plain copy
    use_all = not a.recipe
    if use_all or _given(parser, a, "source") or "source" not in data:
        data["source"] = a.source
    if use_all or _given(parser, a, "dest") or "dest" not in data:
        data["dest"] = a.dest
    for flag, path in _RUN_FLAGS.items():
        value = getattr(a, flag)
        if flag == "shard_size" and value is None:
            continue
        if use_all or _given(parser, a, flag):
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    method = method_from_args(a).to_dict()
    node = data.setdefault("method", {})
    for name in _METHOD_FLAGS:
        if use_all or _given(parser, a, name):
            node[name] = method[name]
    return RunConfig.from_dict(data)


def cmd_quantize(a: argparse.Namespace) -> int:
    from aser.pipeline import driver

    config = config_from_args(a, a._quantize_parser)
    kill_worker = None
    if os.environ.get(KILL_WORKER_ENV):
        rank, layer = os.environ[KILL_WORKER_ENV].split(":")
        kill_worker = (int(rank), int(layer))
    result = driver.run(
        config, show_progress=not a.no_progress, kill_after=os.environ.get(KILL_AFTER_ENV) or None,
        kill_worker=kill_worker,
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
