"""One SmolLM2-135M decoder layer's forward over a 8 x 512 batch, with and without the statistics
hooks, and the whole model's FP forward (LM head included) over the same batch, alone in this
process: what the calibration worker's forward costs when nothing shares the cores, and the
floor it sets for ``benchmarks/pipeline_smollm2.py``'s ratio (``floor_ratio``: every layer's
forward with statistics against the plain model forward, before any reconstruction, start-up or
writing).

    python benchmarks/forward_hooks.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch


def seconds_per_call(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: allocations, first-call dispatch
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layer", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from aser.checkpoint import layers as layer_io
    from aser.checkpoint import safetensors_io as sio
    from aser.pipeline.sources import resolve_source
    from aser.workers.arch import groups_for
    from aser.workers.calibration import FORWARD_BATCH_SIZE, hf_config, read_layer
    from aser.workers.stats import attach_stat_hooks

    src = resolve_source("builtin:smollm2-135m")
    with open(f"{src}/config.json") as f:
        config = hf_config(json.load(f))
    tensors, _, _ = read_layer(sio.open_source(src), config, a.layer)
    layer = layer_io.build_layer(config, a.layer, tensors).float()
    rotary = layer_io.build_rotary(config, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(FORWARD_BATCH_SIZE, 512, config.hidden_size, generator=gen)
    ids = torch.randint(0, config.vocab_size, (FORWARD_BATCH_SIZE, 512), generator=gen)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    def forward() -> None:
        layer_io.run_layer(layer, config, a.layer, x, layer_io.prepare_inputs(config, rotary, x))

    out: dict[str, float] = {}
    with torch.no_grad():
        out["model_s_per_batch"] = seconds_per_call(lambda: model(ids, use_cache=False), a.reps)
        out["model_without_head_s_per_batch"] = seconds_per_call(lambda: model.model(ids, use_cache=False), a.reps)
        out["plain_s_per_batch"] = seconds_per_call(forward, a.reps)
        attach_stat_hooks(layer, groups_for(config))
        out["with_statistics_hooks_s_per_batch"] = seconds_per_call(forward, a.reps)
    L = config.num_hidden_layers
    out["floor_ratio"] = L * out["with_statistics_hooks_s_per_batch"] / out["model_s_per_batch"]
    out["head_share_of_model"] = 1.0 - out["model_without_head_s_per_batch"] / out["model_s_per_batch"]
    print(json.dumps({"threads": a.threads, "batch": f"{FORWARD_BATCH_SIZE} x 512", "layers": L, **out}))


if __name__ == "__main__":
    main()
