"""A random-weight Llama checkpoint of any width and depth, written shard by shard.

``pipeline_run_helpers.write_synthetic_llama`` builds the model with transformers, so the whole
model is in memory and initialised by its (slow) init; here each decoder layer is one shard of
random tensors, written with safetensors as it is made: a checkpoint of 11 layers of 40 MB costs
the test process one layer's memory and a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from pipeline_run_helpers import TOKENIZER_FILES

VOCAB_SIZE = 512  # stories260K's tokenizer


def _layer_shapes(h: int, i: int) -> dict[str, tuple[int, ...]]:
    """Relative tensor names and shapes of a decoder layer (multi-head attention: kv width = h)."""
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)  # RMSNorm weights
    # std 1/sqrt(fan_in): activations keep their scale through the layers.
    return torch.randn(shape, generator=gen) / shape[1] ** 0.5


def layer_bytes(hidden: int, intermediate: int) -> int:
    """Bytes of one decoder layer's tensors (fp32) in ``write_random_llama``'s checkpoints."""
    return 4 * sum(torch.Size(s).numel() for s in _layer_shapes(hidden, intermediate).values())


def write_random_llama(
    out: Path, tokenizer_dir: Path, num_layers: int, hidden: int, intermediate: int, num_heads: int, seed: int = 0
) -> Path:
    """A Llama checkpoint (fp32, untied head, stories260K's tokenizer) with one shard per stage."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    out.mkdir(parents=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    stages: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (VOCAB_SIZE, hidden)}]
    layer = _layer_shapes(hidden, intermediate)
    stages += [{f"model.layers.{i}.{k}": s for k, s in layer.items()} for i in range(num_layers)]
    stages.append({"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB_SIZE, hidden)})
    for n, shapes in enumerate(stages):
        file = f"model-{n + 1:05d}-of-{len(stages):05d}.safetensors"
        save_file({name: _random(shape, gen) for name, shape in shapes.items()}, out / file)
        weight_map.update(dict.fromkeys(shapes, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
