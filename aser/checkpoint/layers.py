"""One decoder layer built from its tensors with transformers' own classes, and run on a batch.

The layer is instantiated on the meta device (no memory, no random init) and filled with
``load_state_dict(assign=True)``, so a worker holds exactly one layer's tensors and never the
model; attention, rotary embeddings and masks are transformers' code, not a re-implementation.

The inputs a layer needs besides the hidden states (rotary cos/sin, position ids, the causal
mask of its attention type) are built once per batch shape by ``prepare_inputs`` the way
``LlamaModel.forward`` / ``Qwen2Model.forward`` build them in transformers 5.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


class UnsupportedArchitecture(ValueError):
    """The checkpoint's model type is not one the project can build layers of or quantize."""


# model_type -> (module, decoder layer class, rotary embedding class)
_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHITECTURES)


class LayerBuildError(ValueError):
    """The given tensors do not make the layer (missing or unexpected names, wrong shapes)."""


def _classes(config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    entry = _ARCHITECTURES.get(config.model_type)
    if entry is None:
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    module = importlib.import_module(entry[0])
    return getattr(module, entry[1]), getattr(module, entry[2])


def check_supported(config: PretrainedConfig) -> None:
    """Raise UnsupportedArchitecture before any work if this model cannot be built."""
    _classes(config)


def layer_config(config: PretrainedConfig, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """A copy of ``config`` with the attention implementation fixed.

    A config read from config.json has none until a whole model is built; a standalone layer
    needs one, and the causal mask must be built for the same one.
    """
    check_supported(config)
    out = copy.deepcopy(config)
    out._attn_implementation = attn_implementation
    return out


def layer_prefix(layer_idx: int) -> str:
    """Checkpoint name prefix of a decoder layer's tensors."""
    return f"model.layers.{layer_idx}."


def meta_layer(config: PretrainedConfig, layer_idx: int = 0) -> nn.Module:
    """Decoder layer ``layer_idx`` of this architecture on the meta device: its tensor names and
    shapes at no cost (transformers' own class decides them)."""
    layer_cls, _ = _classes(config)
    with torch.device("meta"):
        return layer_cls(config, layer_idx)


def build_layer(
    config: PretrainedConfig, layer_idx: int, tensors: Mapping[str, torch.Tensor]
) -> nn.Module:
    """The decoder layer ``layer_idx`` in eval mode, holding ``tensors`` (names relative to the
    layer, e.g. ``self_attn.q_proj.weight``) as its parameters, on their device and dtype."""
    layer_cls, _ = _classes(config)
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx)
    expected = set(layer.state_dict())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise LayerBuildError(
            f"layer {layer_idx} ({config.model_type}): "
            + (f"missing tensors {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected tensors {unexpected}" if unexpected else "")
        )
    try:
        layer.load_state_dict(dict(tensors), strict=True, assign=True)
    except RuntimeError as e:
        raise LayerBuildError(f"layer {layer_idx} ({config.model_type}): {e}") from e
    left_on_meta = [n for n, t in layer.state_dict(keep_vars=True).items() if t.is_meta]
    left_on_meta += [n for n, b in layer.named_buffers() if b.is_meta]
    if left_on_meta:
        raise LayerBuildError(f"layer {layer_idx}: tensors left unset: {sorted(set(left_on_meta))}")
    return layer.eval()


def build_rotary(config: PretrainedConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model's rotary embedding module (it holds only inv_freq, computed from config)."""
    _, rotary_cls = _classes(config)
    # Built on the CPU under no device context: inv_freq must be real, not meta.
    return rotary_cls(config=config).to(torch.device(device))


@dataclass(frozen=True)
class LayerInputs:
    """Everything a decoder layer needs besides the hidden states, for one batch shape."""

    position_ids: torch.Tensor  # (1, T) int64
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, T, head_dim)
    masks: dict[str, Any]  # attention type -> mask (None where the kernel is causal by itself)


def attention_type(config: PretrainedConfig, layer_idx: int) -> str:
    """``full_attention`` or ``sliding_attention`` for this layer, as the model decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return str(layer_types[layer_idx])
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def prepare_inputs(
    config: PretrainedConfig, rotary: nn.Module, hidden: torch.Tensor
) -> LayerInputs:
    """Position ids, rotary cos/sin and causal masks for hidden: (B, T, H), no padding."""
    T = hidden.shape[1]
    position_ids = torch.arange(T, device=hidden.device).unsqueeze(0)
    mask_kwargs: dict[str, Any] = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": None,
        "cache": None,
        "position_ids": position_ids,
    }
    types = {attention_type(config, i) for i in range(config.num_hidden_layers)}
    masks: dict[str, Any] = {}
    if "full_attention" in types:
        masks["full_attention"] = create_causal_mask(**mask_kwargs)
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    with torch.no_grad():
        cos, sin = rotary(hidden, position_ids=position_ids)
    return LayerInputs(position_ids, (cos, sin), masks)


@torch.no_grad()
def run_layer(
    layer: nn.Module, config: PretrainedConfig, layer_idx: int, hidden: torch.Tensor, inputs: LayerInputs
) -> torch.Tensor:
    """hidden: (B, T, H) -> the layer's output (B, T, H), no cache."""
    out = layer(
        hidden,
        attention_mask=inputs.masks[attention_type(config, layer_idx)],
        position_ids=inputs.position_ids,
        position_embeddings=inputs.position_embeddings,
        use_cache=False,
    )
    # Some versions return a tuple (hidden, attn weights); transformers 5 returns the tensor.
    return out[0] if isinstance(out, tuple) else out
