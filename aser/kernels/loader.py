"""Load an ASER output directory into a transformers model whose quantized linears are AserLinear.

The directory (DESIGN.md, "Output layout"): ``config.json`` with a compressed-tensors
``quantization_config``; ``model.safetensors`` or shards + ``model.safetensors.index.json``
holding, per quantized linear, either ``<name>.weight`` int8 INT4 codes (format
``int-quantized``, W4A8) or ``<name>.weight_packed`` int32 + ``<name>.weight_shape``
(``pack-quantized``, W4A16), plus ``<name>.weight_scale`` (N, 1) and optional ``<name>.bias``;
``aser_adapter/`` a PEFT LoRA adapter with lora_A = L_B (r, K) and lora_B = L_A (N, r).

The model skeleton comes from transformers (so every architecture it supports works) with its
parameters on the meta device; no full-precision copy of the model is ever materialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from aser.checkpoint import storage
from aser.checkpoint.export import ACTIVATIONS_KEY, REQUIRES_ADAPTER_KEY
from aser.checkpoint.safetensors_io import open_source, read_tensors
from aser.kernels.backend import Backend
from aser.kernels.gemm import LowRankMode
from aser.kernels.linear import AserLinear
from aser.kernels.quant import int_range, pack_int4

ADAPTER_DIR = "aser_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST_NAME = "aser_manifest.json"
FORMAT_A_BITS = {"int-quantized", "pack-quantized"}
# PEFT writes `base_model.model.<module>.lora_A.weight`; older PEFT kept the adapter name.
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# Non-persistent buffers some old checkpoints carry; transformers recomputes them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class AserLoadError(ValueError):
    """The destination is not a loadable ASER checkpoint; the message names the file/tensor."""


class MissingAdapterWarning(UserWarning):
    """A destination whose base needs its adapter was loaded without one."""


@dataclass(frozen=True)
class QuantSpec:
    """What config.json's quantization_config says, reduced to what the loader needs."""

    format: str
    w_bits: int
    a_bits: int | None
    a_style: str = "compressed-tensors"  # whose INT8 activation quantizer (kernels.quant)


def parse_quantization_config(qc: dict[str, Any]) -> QuantSpec:
    """Validate a compressed-tensors quantization_config for our schemes (W4A8 / W4A16,
    per-channel symmetric INT4 weights, dynamic per-token symmetric INT8 activations)."""
    if qc.get("quant_method") != "compressed-tensors":
        raise AserLoadError(f"config.json: quant_method must be 'compressed-tensors', got {qc.get('quant_method')!r}")
    fmt = qc.get("format")
    if fmt not in FORMAT_A_BITS:
        raise AserLoadError(f"config.json: format {fmt!r} is not one of {sorted(FORMAT_A_BITS)}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise AserLoadError("config.json: quantization_config has no config_groups")
    a_bits_seen: set[int | None] = set()
    for gname, g in groups.items():
        w = g.get("weights") or {}
        if (w.get("num_bits"), w.get("symmetric", True), w.get("strategy"), w.get("type", "int")) != (
            4, True, "channel", "int"
        ):
            raise AserLoadError(
                f"config.json: config_groups.{gname}.weights must be symmetric per-channel INT4, got {w}"
            )
        a = g.get("input_activations")
        if a is None:
            a_bits_seen.add(None)
        elif (a.get("num_bits"), a.get("symmetric", True), a.get("strategy"), a.get("dynamic")) == (
            8, True, "token", True
        ):
            a_bits_seen.add(8)
        else:
            raise AserLoadError(
                f"config.json: config_groups.{gname}.input_activations must be dynamic per-token "
                f"symmetric INT8 or absent, got {a}"
            )
    if len(a_bits_seen) != 1:
        raise AserLoadError("config.json: config_groups disagree on activation quantization")
    return QuantSpec(format=fmt, w_bits=4, a_bits=a_bits_seen.pop())


def engine_activations(spec: QuantSpec, stated: Any) -> QuantSpec:
    """config.json's ``aser_activations`` (activations a serving engine quantizes although the
    quantization_config does not say so: vLLM Marlin's INT8 under VLLM_MARLIN_INPUT_DTYPE=int8)
    applied to a weight-only spec."""
    if stated is None:
        return spec
    if not isinstance(stated, dict) or stated.get("quantizer") != "marlin" or stated.get("num_bits") != 8:
        raise AserLoadError(f"config.json: {ACTIVATIONS_KEY} must state the marlin INT8 quantizer, got {stated!r}")
    if spec.a_bits is not None:
        raise AserLoadError(f"config.json: {ACTIVATIONS_KEY} is given, but the quantization_config already "
                            "quantizes activations")
    return dataclasses.replace(spec, a_bits=8, a_style="marlin")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device; buffers (rotary tables) stay real.

    Plain ``torch.device("meta")`` would also put non-persistent buffers such as ``inv_freq``
    on meta, and those are not in any checkpoint.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def read_json(url: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(url))
    except FileNotFoundError as e:
        raise AserLoadError(f"{storage.redact(url)} is missing") from e
    except json.JSONDecodeError as e:
        raise AserLoadError(f"{storage.redact(url)} is not valid JSON: {e}") from e


def read_adapter(dest: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any] | None]:
    """{module name: (L_A (N, r), L_B (r, K))} from ``aser_adapter/``, with PEFT's scaling
    (lora_alpha / r, or / sqrt(r) with rslora) folded into L_A; and the adapter config.
    Empty (and None) when the destination has no adapter (rank 0 everywhere)."""
    cfg_url = storage.join(dest, ADAPTER_DIR, ADAPTER_CONFIG)
    if not storage.exists(cfg_url):
        return {}, None
    cfg = read_json(cfg_url)
    if cfg.get("peft_type") != "LORA":
        raise AserLoadError(f"{storage.redact(cfg_url)}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if cfg.get("bias", "none") != "none":
        raise AserLoadError(f"{storage.redact(cfg_url)}: bias must be 'none', got {cfg.get('bias')!r}")
    w_url = storage.join(dest, ADAPTER_DIR, ADAPTER_WEIGHTS)
    try:
        tensors = st_load(storage.read_bytes(w_url))
    except FileNotFoundError as e:
        raise AserLoadError(f"{storage.redact(w_url)} is missing") from e
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise AserLoadError(f"{storage.redact(w_url)}: unexpected tensor {key}")
        parts.setdefault(m["name"], {})[m["ab"]] = t
    alpha_default = float(cfg.get("lora_alpha", cfg.get("r", 1)))
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AserLoadError(f"{storage.redact(w_url)}: {name} lacks lora_{'B' if 'A' in ab else 'A'}")
        L_B, L_A = ab["A"], ab["B"]
        r = L_B.shape[0]
        if L_A.shape[1] != r:
            raise AserLoadError(f"{storage.redact(w_url)}: {name} has lora_A {tuple(L_B.shape)} and lora_B {tuple(L_A.shape)}")
        alpha = alpha_default
        # PEFT's rule (get_pattern_key): the first pattern, in order, matching a name suffix.
        for pattern, value in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = float(value)
                break
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r if r else 1.0
        out[name] = (L_A * scaling if scaling != 1.0 else L_A, L_B)
    return out, cfg


def _quantized_linear(
    name: str, t: dict[str, torch.Tensor], linear: nn.Module, spec: QuantSpec,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device, dtype: torch.dtype,
    lowrank_mode: LowRankMode, backend: Backend,
) -> AserLinear:
    if not isinstance(linear, nn.Linear):
        raise AserLoadError(f"{name} has quantized tensors but the model's module is {type(linear).__name__}")
    N, K = linear.out_features, linear.in_features
    if f"{name}.weight_packed" in t:
        packed = t[f"{name}.weight_packed"]
        shape = t.get(f"{name}.weight_shape")
        if shape is None or [int(v) for v in shape.tolist()] != [N, K]:
            raise AserLoadError(f"{name}.weight_shape is {None if shape is None else shape.tolist()}, expected [{N}, {K}]")
        if packed.dtype != torch.int32 or tuple(packed.shape) != (N, (K + 7) // 8):
            raise AserLoadError(f"{name}.weight_packed must be int32 ({N}, {(K + 7) // 8}), got {packed.dtype} {tuple(packed.shape)}")
    elif f"{name}.weight" in t:
        codes = t[f"{name}.weight"]
        if codes.dtype != torch.int8 or tuple(codes.shape) != (N, K):
            raise AserLoadError(f"{name}.weight must be int8 codes ({N}, {K}), got {codes.dtype} {tuple(codes.shape)}")
        qmin, qmax = int_range(spec.w_bits)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise AserLoadError(f"{name}.weight has codes outside the INT4 range [{qmin}, {qmax}]")
        packed = pack_int4(codes)  # one byte per code on disk; 8 per word for the kernel
    else:
        raise AserLoadError(f"{name} has weight_scale but neither weight nor weight_packed")
    scale = t[f"{name}.weight_scale"]
    if scale.numel() != N:
        raise AserLoadError(f"{name}.weight_scale must be ({N}, 1) per-channel, got {tuple(scale.shape)}")
    bias = t.get(f"{name}.bias")
    L_A = L_B = None
    if lowrank is not None:
        L_A, L_B = lowrank
        if L_B.shape[1] != K or L_A.shape[0] != N:
            raise AserLoadError(f"adapter for {name}: L_B {tuple(L_B.shape)} / L_A {tuple(L_A.shape)} do not fit ({N}, {K})")
        L_A, L_B = L_A.to(device, dtype), L_B.to(device, dtype)
    return AserLinear(
        packed.to(device), scale.to(device, dtype), K, L_A=L_A, L_B=L_B,
        bias=None if bias is None else bias.to(device, dtype), a_bits=spec.a_bits, a_style=spec.a_style,
        lowrank_mode=lowrank_mode, backend=backend,
    )


def load_aser_model(
    dest_url_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    lowrank_mode: LowRankMode = "separate",
    backend: Backend = "auto",
) -> PreTrainedModel:
    """A causal LM from an ASER destination (any storage URL or local path), in eval mode.

    Quantized linears become AserLinear (W4A8 or W4A16 from the quantization_config, rank from
    the adapter); everything else (embeddings, norms, lm_head) is loaded in ``dtype``.
    """
    dest = str(dest_url_or_path)
    device = torch.device(device)
    cfg_dict = read_json(storage.join(dest, "config.json"))
    qc = cfg_dict.pop("quantization_config", None)
    if qc is None:
        raise AserLoadError(f"{storage.redact(dest)}/config.json has no quantization_config")
    spec = engine_activations(parse_quantization_config(qc), cfg_dict.pop(ACTIVATIONS_KEY, None))
    requires_adapter = cfg_dict.pop(REQUIRES_ADAPTER_KEY, None)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise AserLoadError(f"{storage.redact(dest)}/config.json has no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)

    source = open_source(dest)
    quantized = sorted(n[: -len(".weight_scale")] for n in source.tensors if n.endswith(".weight_scale"))
    lowrank, _ = read_adapter(dest)
    if requires_adapter and not lowrank:
        warnings.warn(
            f"{storage.redact(dest)}: the base needs its adapter ({REQUIRES_ADAPTER_KEY} in config.json) and "
            f"{requires_adapter.get('adapter', 'aser_adapter')}/ is missing or empty: this model is the base "
            "alone, far worse than the quantized model", MissingAdapterWarning, stacklevel=2)
    stray = sorted(set(lowrank) - set(quantized))
    if stray:
        raise AserLoadError(f"the adapter targets {stray[0]}, which is not a quantized linear of the checkpoint")

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    tensors = read_tensors(source, [n for n in source.tensors if not n.endswith(_IGNORED_SUFFIXES)])
    consumed: set[str] = set()
    for name in quantized:
        mine = {k: v for k, v in tensors.items() if k.startswith(name + ".")}
        consumed.update(mine)
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise AserLoadError(f"checkpoint has quantized tensors for {name}, which the model lacks") from e
        new = _quantized_linear(name, mine, linear, spec, lowrank.get(name), device, dtype, lowrank_mode, backend)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    state: dict[str, torch.Tensor] = {}
    for key, ref in model.state_dict(keep_vars=True).items():
        if any(key.startswith(q + ".") for q in quantized) or key not in tensors:
            continue
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise AserLoadError(f"tensor {key} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        state[key] = t.to(device, dtype if t.is_floating_point() else t.dtype)
        consumed.add(key)
    leftover = sorted(set(tensors) - consumed)
    if leftover:
        raise AserLoadError(f"tensor {leftover[0]} in the checkpoint matches no module of the model")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)
    on_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if on_meta:
        raise AserLoadError(f"tensor {on_meta[0]} is missing from the checkpoint")
    return model.eval()
