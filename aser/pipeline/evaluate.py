"""Perplexity over fixed windows: the one quality figure every path of the project reports;
and `aser eval`'s evaluation of a written DEST through the kernels' loader."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AutoTokenizer

from aser.checkpoint import storage
from aser.checkpoint.export import ACTIVATIONS_KEY
from aser.kernels.loader import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    MANIFEST_NAME,
    QuantSpec,
    engine_activations,
    load_aser_model,
    parse_quantization_config,
    read_json,
)
from aser.pipeline import data


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all predictions of all windows. windows: (W, L) int64."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)


def _local_tokenizer_dir(dest: str, scratch: str) -> str:
    """A local directory with the destination's tokenizer files (copied when dest is remote)."""
    _, path = storage.resolve(dest)
    if Path(path).is_dir():
        return path
    for name in storage.list_dir(dest):
        if name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")) or name == "config.json":
            (Path(scratch) / name).write_bytes(storage.read_bytes(storage.join(dest, name)))
    return scratch


def _describe(dest: str, spec: QuantSpec) -> dict[str, Any]:
    """method and rank from the manifest if present, else from the adapter config."""
    method: str | None = None
    rank: int | None = None
    manifest_url = storage.join(dest, MANIFEST_NAME)
    if storage.exists(manifest_url):
        m = read_json(manifest_url).get("config", {}).get("method", {})
        method = m.get("method")
        rank = m.get("rank")
    if rank is None:
        cfg_url = storage.join(dest, ADAPTER_DIR, ADAPTER_CONFIG)
        rank = int(read_json(cfg_url).get("r", 0)) if storage.exists(cfg_url) else 0
    return {"method": method, "rank": rank, "w_bits": spec.w_bits, "a_bits": spec.a_bits,
            "act_quant": spec.a_style if spec.a_bits is not None else None}


def evaluate_dest(dest: str, eval_text_path: str, seq_len: int, max_windows: int | None) -> dict[str, Any]:
    """Perplexity of the quantized model over the first ``max_windows`` non-overlapping windows
    of ``seq_len`` tokens of the text, tokenized with the destination's tokenizer.

    Runs on CUDA in bf16 when a GPU is present (the Triton kernels), else on CPU in fp32 (the
    references). Returns method, rank, w_bits, a_bits, seq_len, ppl, num_windows, seconds, device.
    """
    t0 = time.perf_counter()
    cfg = read_json(storage.join(dest, "config.json"))
    spec = engine_activations(parse_quantization_config(cfg.get("quantization_config") or {}),
                              cfg.get(ACTIVATIONS_KEY))
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = load_aser_model(dest, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = AutoTokenizer.from_pretrained(_local_tokenizer_dir(dest, scratch))
    ids = data.tokenize(tokenizer, data.load_text(eval_text_path))
    windows = data.eval_windows(ids, seq_len, max_windows)
    ppl = perplexity(model, windows)
    return {
        **_describe(dest, spec),
        "seq_len": seq_len,
        "ppl": ppl,
        "num_windows": int(windows.shape[0]),
        "seconds": time.perf_counter() - t0,
        "device": device,
    }
