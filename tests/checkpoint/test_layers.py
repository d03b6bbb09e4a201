from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from tiny_llama import TINY

from aser.checkpoint import layers
from aser.workers.arch import SUPPORTED_MODEL_TYPES, UnsupportedArchitecture


def _configs():
    return {
        "llama": LlamaConfig(**TINY),
        "mistral": MistralConfig(**TINY, sliding_window=5),  # window < T: the sliding mask matters
        "qwen2": Qwen2Config(**TINY),
        "qwen3": Qwen3Config(**TINY, head_dim=16),
    }


def test_supported_set_matches_the_architecture_table() -> None:
    assert set(layers.SUPPORTED_MODEL_TYPES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_layers_from_tensors_reproduce_the_full_model(model_type: str) -> None:
    torch.manual_seed(0)
    config = _configs()[model_type]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # norms at 1.0 would not catch a misplaced norm weight
            if name.endswith(".bias"):
                p.normal_(0, 0.1)  # qwen2's q/k/v biases are zero-initialised
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if model_type == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, config.vocab_size, (3, 11))

    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
        cfg = layers.layer_config(config)
        hidden = state["model.embed_tokens.weight"][ids]
        rotary = layers.build_rotary(cfg)
        inputs = layers.prepare_inputs(cfg, rotary, hidden)
        for i in range(config.num_hidden_layers):
            prefix = layers.layer_prefix(i)
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layer = layers.build_layer(cfg, i, tensors)
            assert not any(p.is_meta for p in layer.parameters())
            hidden = layers.run_layer(layer, cfg, i, hidden, inputs)
        out = model.model.norm(hidden)
    # Same ops in the same order on the same fp32 data: only kernel-level reassociation differs.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused_before_work() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        layers.layer_config(GPT2Config())


def test_missing_and_unexpected_tensors_are_named() -> None:
    cfg = layers.layer_config(LlamaConfig(**TINY))
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(cfg).model.layers[0].state_dict()
    tensors = dict(full)
    del tensors["mlp.up_proj.weight"]
    tensors["mlp.extra"] = torch.zeros(1)
    with pytest.raises(layers.LayerBuildError, match=r"missing tensors \['mlp.up_proj.weight'\].*mlp.extra"):
        layers.build_layer(cfg, 0, tensors)
    tensors = dict(full)
    tensors["mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(layers.LayerBuildError, match="up_proj"):
        layers.build_layer(cfg, 0, tensors)
