"""The output formats side by side on SmolLM2-135M: for each `--format`, `aser quantize` once,
then the perplexity of what it wrote through each engine that runs here, on the same windows:

    transformers + PEFT   compressed-tensors' own modules (w4a8-int: its INT8 activation
                          quantizer; w4a16-pack: 16-bit activations, as any engine without
                          VLLM_MARLIN_INPUT_DTYPE computes it) plus the adapter
    aser eval             aser's loader and kernels: the arithmetic the run assumed (w4a16-pack:
                          vLLM Marlin's INT8 activation quantizer, kernels.quant.quantize_activation_marlin)

vLLM on CPU is benchmarks/vllm_cpu.py; vLLM on a GPU is benchmarks/gpu_check.sh.

Full size (minutes per format on this 2-core CPU):
    python benchmarks/formats.py
Smoke run (seconds):
    python benchmarks/formats.py --source builtin:stories260k \
        --calib ../shared/data/tinystories/sample.txt --eval ../shared/data/tinystories/sample.txt \
        --num-samples 8 --seq-len 64 --rank 8 --eval-seq-len 64 --eval-windows 8
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_smollm2 import quantize_cmd, run_parser, run_timed, variants_setup  # noqa: E402

FORMATS = ("w4a8-int", "w4a16-pack")


def main() -> int:
    p = run_parser(__doc__, 64)
    p.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    a, windows, header = variants_setup(p, "formats.json")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from aser.pipeline import evaluate

    out: dict = {**header, "formats": {}}
    for fmt in a.formats:
        with tempfile.TemporaryDirectory(prefix="aser-format-") as tmp:
            dest = str(Path(tmp) / "out")
            wall, _ = run_timed(quantize_cmd(a, dest, "--format", fmt, "--workers", "1"))
            config = json.loads((Path(dest) / "config.json").read_text())
            # As DEST's model card loads it (pack-quantized: dense, which PEFT needs).
            dense = {} if fmt == "w4a8-int" else {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
            model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, **dense).eval()
            model = PeftModel.from_pretrained(model, str(Path(dest) / "aser_adapter")).eval()
            t1 = time.perf_counter()
            ppl_hf = evaluate.perplexity(model, windows)
            hf_s = time.perf_counter() - t1
            del model
            ours = evaluate.evaluate_dest(dest, a.eval, a.eval_seq_len, a.eval_windows)
        out["formats"][fmt] = {
            "compression_format": config["quantization_config"]["format"],
            "activations_stated": config.get("aser_activations"),
            "quantize_wall_s": wall,
            "transformers_peft": {"ppl": ppl_hf, "seconds": hf_s},
            "aser_eval": {"ppl": ours["ppl"], "seconds": ours["seconds"], "a_bits": ours["a_bits"],
                          "act_quant": ours["act_quant"], "device": ours["device"]},
        }
        print(f"{fmt:>11} ({config['quantization_config']['format']}): transformers+PEFT {ppl_hf:8.3f}   "
              f"aser eval {ours['ppl']:8.3f} (activations: {ours['act_quant']})   quantize {wall:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
