"""llm-compressor's side of ``benchmarks/vs_llmcompressor.py``: SmoothQuant + GPTQ, W4A8
per-channel (INT4 symmetric per output channel, INT8 dynamic per-token activations: the scheme
``aser quantize`` writes), on the given calibration token ids, saved compressed.

Runs inside llm-compressor's own virtual environment (its transformers pin differs from ours), so
it imports nothing from this project. Prints one JSON line: wall seconds of ``oneshot``, of the
save, and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help="a torch .pt file holding (S, L) int64 token ids")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--smoothing-strength", type=float, default=0.8)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    ids = torch.load(a.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    # The preset "W4A8" uses groups of 128 input channels; this is the per-channel W4A8 that
    # `aser quantize` writes (and the preset's groups do not divide SmolLM2's 576 anyway).
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    )
    recipe = [
        SmoothQuantModifier(smoothing_strength=a.smoothing_strength),
        GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
    t1 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    t2 = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "oneshot_s": t2 - t1, "save_s": t3 - t2,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
