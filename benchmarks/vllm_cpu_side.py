"""vLLM's side of ``benchmarks/vllm_cpu.py``: perplexity of an ``aser quantize`` DEST served by
vLLM on the CPU, the base alone and with its ``aser_adapter`` as a LoRA request, from the prompt
logprobs of each evaluation window (one generated token per request; only the prompt counts).

Runs inside vLLM's own virtual environment (``vllm-cpu``, its torch and transformers pins differ
from ours), so it imports nothing from this project. The windows come as token ids (a JSON list of
lists) and are sent as ``TokensPrompt``s: no tokenizer on this side, the same ids as transformers
sees. vLLM reports no logprob for a prompt's first token (nothing predicts it: ``None``), so each
window of L tokens counts its L - 1 predicted tokens, as ``aser.pipeline.evaluate.perplexity``
does. Writes one JSON object to --out: vLLM's version, perplexities, NLL sums and counts, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any


def window_nll(prompt_ids: list[int], prompt_logprobs: list[Any] | None) -> tuple[float, int]:
    """Summed NLL of a window's predicted tokens (all but the first) and how many they are."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(prompt_ids):
        raise SystemExit(f"prompt_logprobs: expected {len(prompt_ids)} entries, got "
                         f"{None if prompt_logprobs is None else len(prompt_logprobs)}")
    if prompt_logprobs[0] is not None:
        raise SystemExit("vLLM returned a logprob for the first prompt token; the count would differ")
    nll = 0.0
    for tok, entry in zip(prompt_ids[1:], prompt_logprobs[1:]):
        # prompt_logprobs=0: each entry holds the prompt token's own logprob (and no top-k others).
        nll -= float(entry[tok].logprob)
    return nll, len(prompt_ids) - 1


def perplexity(llm: Any, windows: list[list[int]], lora: Any) -> dict[str, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, lora_request=lora,
                        use_tqdm=False)
    seconds = time.perf_counter() - t0
    nll, count = 0.0, 0
    for w, o in zip(windows, outs):
        if list(o.prompt_token_ids) != w:
            raise SystemExit("vLLM's prompt token ids differ from the window sent")
        n, c = window_nll(w, o.prompt_logprobs)
        nll, count = nll + n, count + c
    return {"ppl": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="the DEST directory `aser quantize` wrote")
    p.add_argument("--windows", required=True, help="a JSON file: a list of windows, each a list of token ids")
    p.add_argument("--adapter", default=None, help="default: MODEL/aser_adapter")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--out", required=True, help="where the JSON goes (vLLM writes to stdout too)")
    a = p.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import vllm
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    with open(a.windows) as f:
        windows = [[int(t) for t in w] for w in json.load(f)]
    seq_len = max(len(w) for w in windows)
    t0 = time.perf_counter()
    # max_num_seqs=1: with LoRA enabled, vLLM 0.32's CPU punica wrapper applies the logits
    # processor's per-request LoRA indices to the prompt-logprob rows of one request (L - 1 rows
    # against one index per scheduled request): two requests in a step fail in einsum, one
    # broadcasts its own index over its rows, which is right.
    llm = LLM(model=a.model, enable_lora=True, max_lora_rank=a.max_lora_rank, dtype="float32",
              enforce_eager=True, max_model_len=seq_len + 8, seed=0, max_num_seqs=1)
    load_s = time.perf_counter() - t0
    lora = LoRARequest("aser", 1, a.adapter or os.path.join(a.model, "aser_adapter"))
    base = perplexity(llm, windows, None)
    adapter = perplexity(llm, windows, lora)
    with open(a.out, "w") as f:
        json.dump({"vllm_version": vllm.__version__, "load_s": load_s, "base": base, "adapter": adapter,
                   "wall_s": time.perf_counter() - t0}, f)


if __name__ == "__main__":
    main()
