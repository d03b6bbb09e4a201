"""Helpers for the driver tests: configs, synthetic checkpoints, output comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from aser.checkpoint import storage
from aser.pipeline.config import CalibConfig, RunConfig, WorkersConfig
from aser.workers.reconstruct import MethodConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
# Small enough for a 2-core machine, big enough that each worker forwards more than one batch.
NUM_SAMPLES, SEQ_LEN = 12, 64
METHOD = MethodConfig(method="aser", rank=8, num_outliers=4)


def run_config(source: str, dest: str, calib: str, num_workers: int = 1, **kw) -> RunConfig:
    return RunConfig(
        source=source,
        dest=dest,
        method=kw.pop("method", METHOD),
        calib=CalibConfig(source=calib, num_samples=kw.pop("num_samples", NUM_SAMPLES), seq_len=SEQ_LEN),
        workers=WorkersConfig(num_workers=num_workers, num_cpus_per_worker=0.5),
        **kw,
    )


def output_files(dest: str) -> dict[str, bytes]:
    """Every file of a finished DEST except the manifest (it records times), by relative path."""
    fs, root = storage.resolve(dest)
    out = {}
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")) + 1 :]
        if rel != "aser_manifest.json":
            out[rel] = bytes(fs.cat_file(path))
    return out


def write_synthetic_llama(out: Path, tokenizer_dir: Path, num_layers: int, hidden: int = 64, seed: int = 0) -> Path:
    """A random-weight Llama checkpoint (vocab 512, stories260K's tokenizer) written to ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def copy_checkpoint(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    for p in out.iterdir():
        p.chmod(0o644)
    return out


def read_index(dest: Path) -> dict:
    return json.loads((dest / "model.safetensors.index.json").read_text())
