"""Per-architecture knowledge in one table: which linears share an input, where smoothing folds.

A smoothing scale m (K,) for a group's input x is made exact by ``x̃ = x / m`` upstream and
``W̃ = W · diag(m)`` in every linear of the group. The producer of x absorbs ``1/m``:
- an RMSNorm producer: its weight (x = w ⊙ norm(h)) is divided by m;
- a linear producer: its rows (and bias) are divided by m. This is exact for down_proj's input
  ``act(gate) ⊙ up`` (linear in up) and for o_proj's input (attention output is linear in v,
  softmax rows summing to 1 carries v's bias through) — but only without GQA head sharing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from aser.checkpoint.layers import UnsupportedArchitecture

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input; ``producer`` is the module whose output that input is."""

    name: str
    linears: tuple[str, ...]
    producer: str
    producer_kind: Literal["norm", "linear_rows"]


_LLAMA_GROUPS = (
    LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
    LinearGroup("o", ("self_attn.o_proj",), "self_attn.v_proj", "linear_rows"),
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
    LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear_rows"),
)


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def check_supported(config: Any) -> None:
    model_type = _get(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def groups_for(config: Any) -> tuple[LinearGroup, ...]:
    """The linear groups of one decoder layer of this architecture (HF config or dict)."""
    check_supported(config)
    return _LLAMA_GROUPS


def linear_names(config: Any) -> tuple[str, ...]:
    return tuple(name for g in groups_for(config) for name in g.linears)


def can_fold(group: LinearGroup, config: Any) -> bool:
    """Whether a per-channel scale on this group's input can be folded into its producer exactly."""
    if group.producer_kind == "norm":
        return True
    if group.name == "o":
        # o_proj's input channel (head h, dim d) comes from v head h // (H / H_kv): with GQA one
        # v row feeds several o channels, which would need equal scales.
        heads = _get(config, "num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads") or heads
        return bool(heads == kv_heads)
    return True


# Rows per block of a fold's float64 arithmetic: a whole Llama-3-70B gate_proj in float64 and
# its product were 3.5 GiB of temporaries beside the 0.44 GiB result (measured: the smoothing
# task's private peak 5.6 GiB where its tensors are 3 GiB); a block of rows keeps them small.
FOLD_ROW_BLOCK = 1024


def _rows_in_float64(W: torch.Tensor, op: Any, with_offset: bool = False) -> torch.Tensor:
    """A new tensor like W: op applied in float64 to each block of rows, cast back to W's dtype.
    Elementwise, so the same bits as on the whole matrix at once."""
    out = torch.empty_like(W)
    for r0 in range(0, W.shape[0], FOLD_ROW_BLOCK):
        w = W[r0 : r0 + FOLD_ROW_BLOCK].to(torch.float64, copy=True)
        out[r0 : r0 + FOLD_ROW_BLOCK] = op(w, r0) if with_offset else op(w)
    return out


def fold_smoothing(
    tensors: dict[str, torch.Tensor], group: LinearGroup, m: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Return a copy of a layer's FP tensors with scale m (K,) folded: exact in exact arithmetic.

    tensors: relative names ('self_attn.q_proj.weight', 'input_layernorm.weight', ...).
    Arithmetic in float64, results cast back to each tensor's dtype.
    """
    out = dict(tensors)
    m64 = m.to(torch.float64)
    for lin in group.linears:
        out[f"{lin}.weight"] = _rows_in_float64(tensors[f"{lin}.weight"], lambda w: w.mul_(m64[None, :]))
    pw = tensors[f"{group.producer}.weight"]
    if group.producer_kind == "norm":
        out[f"{group.producer}.weight"] = (pw.to(torch.float64) / m64).to(pw.dtype)
    else:
        out[f"{group.producer}.weight"] = _rows_in_float64(
            pw, lambda w, r0: w.div_(m64[r0 : r0 + w.shape[0], None]), with_offset=True)
        bias_key = f"{group.producer}.bias"
        if bias_key in tensors:
            b = tensors[bias_key]
            out[bias_key] = (b.to(torch.float64) / m64).to(b.dtype)
    return out
