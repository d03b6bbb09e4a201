"""One SmolLM2-135M decoder layer's forward over a 8 x 512 batch, with and without the statistics
hooks, alone in this process: what the calibration worker's forward costs when nothing shares
the cores (compare with the per-batch figure of a pipeline run).

    python benchmarks/forward_hooks.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from aser.checkpoint import layers as layer_io
    from aser.checkpoint import safetensors_io as sio
    from aser.pipeline.sources import resolve_source
    from aser.workers.arch import groups_for
    from aser.workers.calibration import FORWARD_BATCH_SIZE, hf_config, read_layer
    from aser.workers.stats import attach_stat_hooks

    src = resolve_source("builtin:smollm2-135m")
    with open(f"{src}/config.json") as f:
        config = hf_config(json.load(f))
    tensors, _ = read_layer(sio.open_source(src), config, 3)
    layer = layer_io.build_layer(config, 3, tensors).float()
    rotary = layer_io.build_rotary(config, torch.device("cpu"))
    x = torch.randn(FORWARD_BATCH_SIZE, 512, config.hidden_size, generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        layer_io.run_layer(layer, config, 3, x, layer_io.prepare_inputs(config, rotary, x))

    out = {}
    with torch.no_grad():
        for name in ("plain", "with_statistics_hooks"):
            if name == "with_statistics_hooks":
                attach_stat_hooks(layer, groups_for(config))
            forward()
            t0 = time.perf_counter()
            for _ in range(a.reps):
                forward()
            out[f"{name}_s_per_batch"] = (time.perf_counter() - t0) / a.reps
    print(json.dumps({"threads": a.threads, "batch": f"{FORWARD_BATCH_SIZE} x 512", **out}))


if __name__ == "__main__":
    main()
