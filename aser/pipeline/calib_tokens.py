"""The calibration token ids of a run: from the source's tokenizer and the calibration text.

The driver computes them once (they are small: num_samples x seq_len int64), hashes them into
the manifest, and hands each worker its contiguous share.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from aser.checkpoint import storage

from aser.pipeline import data
from aser.pipeline.config import RunConfig
from aser.checkpoint.export import COPIED_FILES

# What a tokenizer needs: the files export copies to DEST, plus the model config.
TOKENIZER_FILES: tuple[str, ...] = (*COPIED_FILES, "config.json")
# Without calibration text the samples are drawn from the model itself, which needs the whole
# model in one process (a child of the driver): allowed for small local checkpoints only.
SELF_GENERATE_MAX_BYTES = 2 * 1024**3


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def load_tokenizer(source_url: str) -> Any:
    """The source's tokenizer; a data.DataError naming the source and the files found when
    transformers cannot build it (it raises half a dozen exception types, some multi-line)."""
    from transformers import AutoTokenizer

    try:
        if _is_local(source_url):
            return AutoTokenizer.from_pretrained(source_url.removeprefix("file://"))
        with tempfile.TemporaryDirectory(prefix="aser-tok-") as tmp:
            for name in TOKENIZER_FILES:
                url = storage.join(source_url, name)
                if storage.exists(url):
                    (Path(tmp) / name).write_bytes(storage.read_bytes(url))
            return AutoTokenizer.from_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - every failure of the library becomes one message
        found = [n for n in TOKENIZER_FILES if n not in ("config.json", "generation_config.json")
                 and storage.exists(storage.join(source_url, n))]
        cause = " ".join(str(e).split())[:300] or type(e).__name__
        raise data.DataError(
            f"cannot load the tokenizer of {storage.redact(source_url)} (tokenizer files found: "
            f"{', '.join(found) or 'none'}): {cause}"
        ) from e


def calibration_tokens(config: RunConfig, source_url: str, source_size_bytes: int) -> tuple[torch.Tensor, str]:
    """(token ids (num_samples, seq_len) int64, a description of where they came from)."""
    calib = config.calib
    if calib.source is None and (not _is_local(source_url) or source_size_bytes > SELF_GENERATE_MAX_BYTES):
        raise data.DataError(
            "calib.source is required for this source: without calibration text the samples are "
            f"drawn from the model itself, which aser does only for local checkpoints under "
            f"{SELF_GENERATE_MAX_BYTES // 1024**3} GiB (pass --calib TEXT_URL)"
        )
    tok = load_tokenizer(source_url)
    if calib.source is not None:
        ids = data.tokenize(tok, data.load_text(calib.source))
        windows = data.calibration_windows(ids, calib.num_samples, calib.seq_len, calib.seed)
        return windows, f"{storage.redact(calib.source)} ({ids.numel()} tokens)"
    del tok
    # In a child process: the model (2 GiB at most, see above) never enters the driver, whose
    # memory stays metadata-sized (measured on SmolLM2-135M, 64 x 128: the driver's peak while
    # sampling 1569 MiB in-process); the child's memory is returned when it exits. A plain
    # subprocess rather than multiprocessing's spawn, which re-runs the caller's main script.
    with tempfile.TemporaryDirectory(prefix="aser-calib-") as tmp:
        out, err = Path(tmp) / "tokens.pt", Path(tmp) / "error.txt"
        # stderr is the driver's: the child's progress bar shows as it samples.
        proc = subprocess.run([sys.executable, "-m", __name__, source_url, str(calib.num_samples),
                               str(calib.seq_len), str(calib.seed), str(out), str(err)], stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.exists():
            why = err.read_text().strip() if err.exists() else f"the sampling process ended with status {proc.returncode}"
            raise data.DataError(f"sampling calibration from {storage.redact(source_url)} failed: {why}")
        windows = torch.load(out, weights_only=True)
    return windows, "self-generated (sampled from the model; no calibration text given)"


def _self_generate(source_url: str, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``data.self_generated_windows`` of the local checkpoint at ``source_url``."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(source_url)
    model = AutoModelForCausalLM.from_pretrained(source_url.removeprefix("file://")).eval()
    return data.self_generated_windows(model, tok, num_samples, seq_len, seed)


if __name__ == "__main__":  # the child of ``calibration_tokens``: SOURCE NUM_SAMPLES SEQ_LEN SEED OUT ERR
    src, n, length, seed, path, err_path = sys.argv[1:]
    try:
        torch.save(_self_generate(src, int(n), int(length), int(seed)), path)
    except Exception as e:  # noqa: BLE001 - one line for the parent's error message
        Path(err_path).write_text(f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
        sys.exit(2)
