"""`aser plan` for Llama-3-70B and Llama-3.1-405B on 8xH100 / 8xH200 nodes (config-only
directories written here: nothing downloaded), and for SmolLM2-135M on this CPU.

    python benchmarks/plan_table.py [--json plan_table.json]

Prints a markdown table: per process kind the peak host / GPU memory, bytes moved, the time
estimate and whether it fits. The figures come from the same code the driver uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from transformers import LlamaConfig

from aser.pipeline.plan_cmd import PROFILES, cpu_profile, make_report, read_shape

# config.json values of meta-llama/Meta-Llama-3-70B and meta-llama/Llama-3.1-405B.
MODELS = {
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
    "Llama-3.1-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8),
}
RUNS = [("Llama-3-70B", "h100", 1), ("Llama-3-70B", "h200", 1), ("Llama-3.1-405B", "h100", 2),
        ("Llama-3.1-405B", "h200", 2)]


def write_config(out: Path, **dims: int) -> Path:
    out.mkdir(parents=True)
    LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False, torch_dtype="bfloat16", **dims).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--smollm2", default="builtin:smollm2-135m", help="SmolLM2 source for the CPU row (builtin name or path)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, profile, nodes in RUNS:
            shape = read_shape(str(write_config(Path(tmp) / f"{model}-{profile}", **MODELS[model])))
            rep = make_report(shape, PROFILES[profile], nodes, None, None, None, 128, 2048, 64, 8)
            rows.append((f"{model}, {nodes}x8x{profile.upper()}, 128x2048, r=64", rep))
    try:
        rep = make_report(read_shape(args.smollm2), cpu_profile(), 1, 1, 0.0, 0.0, 128, 512, 32, 8)
        rows.append(("SmolLM2-135M, this CPU (2 cores), 128x512, r=32", rep))
    except (OSError, ValueError) as e:
        print(f"SmolLM2 row skipped: {e}", file=sys.stderr)
    gib = 2**30
    kinds = ("driver", "calibration", "smooth", "reconstruct", "writer", "finalize")
    print("| run | " + " | ".join(f"{k} host/GPU GiB" for k in kinds) + " | read GB | written GB | "
          "est. time | fits |")
    print("|---|" + "---|" * (len(kinds) + 4))
    for name, rep in rows:
        procs = {x["kind"]: x for x in rep["processes"]}
        cells = [f"{procs[k]['peak_host_bytes'] / gib:.1f}/{procs[k]['peak_gpu_bytes'] / gib:.1f}" for k in kinds]
        s = rep["seconds_estimate"]
        print(f"| {name} | " + " | ".join(cells) + f" | {rep['bytes_read'] / 1e9:.0f} | "
              f"{rep['bytes_written'] / 1e9:.0f} | {s['total'] / 60:.0f} min | "
              f"{'yes' if not rep['fits'] else 'no: ' + '; '.join(rep['fits'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({name: rep for name, rep in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
