"""Text for calibration and evaluation: tokenized once, cut into fixed-length windows."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import torch

from aser.checkpoint import storage


class DataError(ValueError):
    pass


def load_text(url: str) -> str:
    try:
        return storage.read_text(url)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read text from {storage.redact(url)}: {e}") from e


DOC_SEPARATOR = "<|endoftext|>"


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one (T,) int64 sequence. Documents separated by ``<|endoftext|>`` are
    tokenized one by one (each gets BOS when the tokenizer adds one) and concatenated."""
    docs = [d.strip() for d in text.split(DOC_SEPARATOR)] if DOC_SEPARATOR in text else [text]
    parts = [tokenizer(d, return_tensors="pt", add_special_tokens=True).input_ids[0] for d in docs if d]
    if not parts:
        raise DataError("text is empty")
    return torch.cat(parts).to(torch.int64)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The first `max_windows` non-overlapping windows of `seq_len` tokens: (W, L) int64."""
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def calibration_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets (GPTQ-style): (S, L)."""
    if ids.numel() < seq_len + 1:
        raise DataError(
            f"calibration text too short: {ids.numel()} tokens, need more than seq_len={seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class _TokenProgress:
    """A ``generate`` streamer that advances a progress bar by one per generated position
    (transformers calls ``put`` with the prompt first, then once per new token of the batch)."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.prompt_seen = bar, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(int(value.shape[0]))
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False


@torch.no_grad()
def self_generated_windows(
    model: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int, batch_size: int = 64,
    show_progress: bool = True,
) -> torch.Tensor:
    """Calibration text sampled from the model itself (no corpus): (S, L) int64.

    Each sample starts at BOS and is drawn with temperature 1 (plain multinomial sampling), in
    batches of ``batch_size`` sequences, with a progress bar over the tokens drawn. (SmolLM2-135M
    on 2 cores: 97, 132 and 186 tokens/s at batches of 16, 32 and 64.)
    """
    from tqdm import tqdm

    print(
        f"[aser] no calibration text given: sampling {num_samples} x {seq_len} tokens from the model itself",
        file=sys.stderr,
    )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out = []
    with tqdm(total=num_samples * (seq_len - 1), desc="sampling calibration", unit="tok", unit_scale=True,
              disable=not show_progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - start)
            prompt = torch.full((b, 1), bos, dtype=torch.int64)
            gen = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_length=seq_len, min_length=seq_len, pad_token_id=tokenizer.eos_token_id,
                streamer=_TokenProgress(bar),
            )
            out.append(gen[:, :seq_len])
    return torch.cat(out)


def tokens_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
