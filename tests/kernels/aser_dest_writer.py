"""A minimal writer of the ASER output layout, for loader tests (the real one is
aser/checkpoint/export.py). It writes exactly what compressed-tensors writes for our schemes:
int-quantized: ``<name>.weight`` int8 codes + ``<name>.weight_scale`` (N, 1);
pack-quantized: ``<name>.weight_packed`` int32, ``<name>.weight_scale``, ``<name>.weight_shape``
(int64, as ``torch.tensor(weight.shape)`` in PackedQuantizationCompressor.compress).

It also returns the pieces a fake-quantization simulation needs, and builds that simulation.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from aser.kernels.quant import dequantize_weight, fake_quantize_activation, pack_int4, quantize_weight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class QuantizedPieces:
    q: torch.Tensor  # (N, K) int8 codes
    scale: torch.Tensor  # (N, 1)
    L_A: torch.Tensor | None  # (N, r)
    L_B: torch.Tensor | None  # (r, K)
    bias: torch.Tensor | None


def quantization_config(a_bits: int | None) -> dict:
    weights = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    acts = (QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
            if a_bits == 8 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    cfg = QuantizationConfig(config_groups={"group_0": scheme},
                             format="int-quantized" if a_bits == 8 else "pack-quantized",
                             ignore=["lm_head"], quantization_status="compressed")
    return cfg.model_dump(exclude_none=True)


@dataclass(frozen=True)
class AdapterScaling:
    """PEFT's adapter scaling fields. lora_alpha None: alpha = r for every module (scaling 1)."""

    lora_alpha: float | None = None
    alpha_pattern: dict[str, float] | None = None  # PEFT keys: a regex matching a name suffix
    use_rslora: bool = False

    def scaling(self, name: str, r: int) -> float:
        """What PEFT multiplies lora_B @ lora_A by, resolved with PEFT's own pattern rule."""
        if self.lora_alpha is None:
            return 1.0
        pattern = self.alpha_pattern or {}
        alpha = pattern.get(get_pattern_key(list(pattern), name), self.lora_alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _adapter_config(ranks: dict[str, int], scaling: AdapterScaling) -> dict:
    used = sorted({n for n, r in ranks.items() if r})
    rs = [ranks[n] for n in used]
    acfg = {"peft_type": "LORA", "r": rs[0], "lora_alpha": rs[0], "bias": "none",
            "target_modules": sorted({n.rsplit(".", 1)[1] for n in used}),
            "task_type": "CAUSAL_LM"}
    if len(set(rs)) > 1:
        acfg["rank_pattern"] = {n: ranks[n] for n in used}
        acfg["alpha_pattern"] = {n: ranks[n] for n in used}
    if scaling.lora_alpha is not None:
        acfg["lora_alpha"] = scaling.lora_alpha
        acfg["alpha_pattern"] = scaling.alpha_pattern or {}
        acfg["use_rslora"] = scaling.use_rslora
    return acfg


def write_dest(model: PreTrainedModel, dest: Path, a_bits: int | None, ranks: dict[str, int],
               seed: int = 0, scaling: AdapterScaling = AdapterScaling()) -> dict[str, QuantizedPieces]:
    """Quantize every decoder linear of ``model`` (RTN per channel) and add a low-rank term of
    the given rank per linear name (0 or absent: none): the top singular pairs of the error
    when r is small, so the correction is a realistic one. Writes the DEST layout to ``dest``;
    the adapter's lora_B is L_A divided by PEFT's scaling, so that a reader applying the
    scaling recovers the pieces' L_A."""
    dest.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pieces: dict[str, QuantizedPieces] = {}
    adapter: dict[str, torch.Tensor] = {}
    for i in range(model.config.num_hidden_layers):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            W = sd.pop(f"{name}.weight")
            q, scale = quantize_weight(W, 4)
            if a_bits == 8:
                sd[f"{name}.weight"] = q
            else:
                sd[f"{name}.weight_packed"] = pack_int4(q)
                sd[f"{name}.weight_shape"] = torch.tensor(W.shape)
            sd[f"{name}.weight_scale"] = scale
            r = ranks.get(name, 0)
            L_A = L_B = None
            if r:
                E = W - dequantize_weight(q, scale)
                U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
                jitter = 1 + 0.01 * torch.randn(r, generator=g, dtype=torch.float64)
                L_A = (U[:, :r] * (S[:r] * jitter)).to(W.dtype).contiguous()
                L_B = Vh[:r].to(W.dtype).contiguous()
                adapter[f"base_model.model.{name}.lora_A.weight"] = L_B
                adapter[f"base_model.model.{name}.lora_B.weight"] = (L_A / scaling.scaling(name, r)).contiguous()
            pieces[name] = QuantizedPieces(q, scale, L_A, L_B, sd.get(f"{name}.bias"))
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(a_bits)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    if adapter:
        (dest / "aser_adapter").mkdir(exist_ok=True)
        (dest / "aser_adapter" / "adapter_config.json").write_text(
            json.dumps(_adapter_config(ranks, scaling), indent=2))
        save_file(adapter, str(dest / "aser_adapter" / "adapter_model.safetensors"))
    return pieces


class FakeQuantLinear(nn.Module):
    """The simulation the kernels must reproduce, in float64:
    y = DQ(q, s) Q_a(x) + L_A (L_B x) + bias (activations fake-quantized when a_bits = 8).

    The activation codes come from quant.py in x's dtype, as in the pipeline's SimQuantLinear
    and the kernels: in float64, x / scale for a row's negative absmax element lands on either
    side of -127.5 (code -127 or -128) for about one token in eight, unlike in fp32.
    """

    def __init__(self, p: QuantizedPieces, a_bits: int | None, a_style: str = "compressed-tensors") -> None:
        super().__init__()
        self.p, self.a_bits, self.a_style = p, a_bits, a_style

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) float -> (..., N) float64."""
        x64 = x.double()
        xa = fake_quantize_activation(x, 8, self.a_style).double() if self.a_bits == 8 else x64
        y = xa @ dequantize_weight(self.p.q, self.p.scale.double()).T
        if self.p.L_A is not None and self.p.L_B is not None:
            y = y + (x64 @ self.p.L_B.double().T) @ self.p.L_A.double().T
        if self.p.bias is not None:
            y = y + self.p.bias.double()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x).to(x.dtype)


def fake_quant_model(model: nn.Module, pieces: dict[str, QuantizedPieces], a_bits: int | None) -> nn.Module:
    sim = copy.deepcopy(model)
    for name, p in pieces.items():
        parent, _, child = name.rpartition(".")
        setattr(sim.get_submodule(parent), child, FakeQuantLinear(p, a_bits))
    return sim.eval()
