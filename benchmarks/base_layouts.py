"""What the base holds in ASER's outlier columns (`--base-outliers`), measured: for each layout,
`aser quantize` on SmolLM2-135M, then the perplexity of the written base alone and of base +
adapter, both loaded through transformers + PEFT (what a user of the checkpoint runs), on the
same test windows.

    zero     the base holds 0 there; the adapter carries the columns exactly (ASER's own layout)
    clipped  the base holds the columns rounded at the row's scale of the other columns (clipped
             to INT4); the adapter carries the rest exactly
    full     the row's scale covers every column; the base holds the columns rounded; the adapter
             carries the rest exactly

Full size (minutes per layout on this 2-core CPU):
    python benchmarks/base_layouts.py
Smoke run (seconds):
    python benchmarks/base_layouts.py --source builtin:stories260k \
        --calib ../shared/data/tinystories/sample.txt --eval ../shared/data/tinystories/sample.txt \
        --num-samples 8 --seq-len 64 --rank 8 --eval-seq-len 64 --eval-windows 8
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_smollm2 import quantize_cmd, run_parser, run_timed, variants_setup  # noqa: E402

LAYOUTS = ("zero", "clipped", "full")


def main() -> int:
    p = run_parser(__doc__, 64)
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=LAYOUTS)
    a, windows, header = variants_setup(p, "base_layouts.json")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aser.pipeline import evaluate
    from aser.pipeline.sources import resolve_source

    src = resolve_source(a.source)
    fp_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    out: dict = {**header, "engine": "transformers + compressed-tensors (+ PEFT for the adapter), float32",
                 "ppl_fp": evaluate.perplexity(fp_model, windows), "layouts": {}}
    del fp_model
    print(f"fp perplexity {out['ppl_fp']:.3f} ({out['eval']})", flush=True)
    for layout in a.layouts:
        with tempfile.TemporaryDirectory(prefix="aser-layout-") as tmp:
            dest = str(Path(tmp) / "out")
            wall, _ = run_timed(quantize_cmd(a, dest, "--base-outliers", layout, "--workers", "1"))
            adapter_config = json.loads((Path(dest) / "aser_adapter" / "adapter_config.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
            ppl_base = evaluate.perplexity(model, windows)
            model = PeftModel.from_pretrained(model, str(Path(dest) / "aser_adapter")).eval()
            ppl = evaluate.perplexity(model, windows)
        out["layouts"][layout] = {
            "ppl_base_alone": ppl_base, "ppl_base_with_adapter": ppl, "quantize_wall_s": wall,
            "adapter_rank": adapter_config["r"],
        }
        print(f"{layout:>8}: base alone {ppl_base:12.3f}   base + adapter {ppl:8.3f}   "
              f"(quantize {wall:.0f} s, adapter rank {adapter_config['r']})", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
