"""In-process simulation: apply a method to a model in memory with exact W4A8 numerics.

Layer by layer, as the distributed pipeline does: capture the inputs of layer 0 once, then for
each layer run the calibration batches through it with statistics hooks, quantize it (steps
1–3), replace its linears by fake-quantized ones, and hand the next layer either the FP outputs
(``propagate="fp"``) or the quantized layer's outputs (``"quantized"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aser.pipeline.manifest import ADAPTER_VALUE_BITS, ExtraCost, extra_cost
from aser.workers.arch import groups_for
from aser.workers.qlinear import SimQuantLinear, install_quantized
from aser.workers.reconstruct import MethodConfig, quantize_layer
from aser.workers.stats import GroupStats, attach_stat_hooks

LayerStats = dict[str, GroupStats]


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration hidden states entering a layer, in batches, and the kwargs transformers passes."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@dataclass
class SimReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = model.get_submodule("model.layers")
    assert isinstance(layers, nn.ModuleList)
    return layers


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the embedding (and rotary) part of the model for each batch; stop at layer 0."""
    captured = LayerInputs([], [])

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    h = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(tokens[i : i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return captured


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, config: Any, with_stats: bool) -> tuple[LayerInputs, LayerStats | None]:
    """Forward all batches through one layer; optionally accumulate per-group statistics."""
    handles, accs = attach_stat_hooks(layer, groups_for(config)) if with_stats else ([], {})
    try:
        outs = [_out(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    finally:
        for hd in handles:
            hd.remove()
    stats = {name: acc.take() for name, acc in accs.items()} if with_stats else None
    return LayerInputs(outs, inputs.kwargs), stats


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in layer.state_dict().items()}


def quantize_model_layer(
    layer: nn.Module, stats: LayerStats, cfg: MethodConfig, config: Any
) -> dict[str, Any]:
    t0 = time.perf_counter()
    sm, results = quantize_layer(layer_tensors(layer), stats, cfg, config)
    install_quantized(layer, sm, results, cfg)
    rec: dict[str, Any] = {"seconds": time.perf_counter() - t0, "choices": sm.choices}
    rec["linears"] = {name: r.metrics for name, r in results.items()}
    return rec


@torch.no_grad()
def collect_fp_stats(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> tuple[list[LayerStats], float]:
    """Statistics of every layer from one FP pass (reusable across methods). Returns (stats, s)."""
    t0 = time.perf_counter()
    inputs = capture_layer_inputs(model, tokens, batch_size)
    all_stats = []
    for layer in decoder_layers(model):
        inputs, st = run_layer(layer, inputs, model.config, with_stats=True)
        assert st is not None
        all_stats.append(st)
    return all_stats, time.perf_counter() - t0


@torch.no_grad()
def apply_method(
    model: nn.Module,
    cfg: MethodConfig,
    *,
    tokens: torch.Tensor | None = None,
    fp_stats: list[LayerStats] | None = None,
    propagate: str = "fp",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> SimReport:
    """Quantize `model` in place with `cfg`. Give `fp_stats` (from collect_fp_stats) to reuse
    one FP pass across methods, or `tokens` to calibrate here (required for propagate="quantized")."""
    cfg.validate()
    report = SimReport()
    layers = decoder_layers(model)
    t_stats = t_quant = 0.0
    inputs = None
    if fp_stats is None:
        if tokens is None:
            raise ValueError("apply_method needs calibration tokens or precomputed statistics")
        t0 = time.perf_counter()
        inputs = capture_layer_inputs(model, tokens, batch_size)
        t_stats += time.perf_counter() - t0
    elif propagate != "fp":
        raise ValueError("precomputed FP statistics only serve propagate='fp'")
    for i, layer in enumerate(layers):
        if fp_stats is not None:
            stats = fp_stats[i]
        else:
            assert inputs is not None
            t0 = time.perf_counter()
            out, st = run_layer(layer, inputs, model.config, with_stats=True)
            assert st is not None
            stats = st
            t_stats += time.perf_counter() - t0
        rec = quantize_model_layer(layer, stats, cfg, model.config)
        t_quant += rec["seconds"]
        if fp_stats is None:
            assert inputs is not None
            t0 = time.perf_counter()
            inputs = out if propagate == "fp" else run_layer(layer, inputs, model.config, with_stats=False)[0]
            t_stats += time.perf_counter() - t0
        rec["layer"] = i
        report.layers.append(rec)
        if progress is not None:
            progress(i + 1, len(layers))
    report.seconds = {"statistics": t_stats, "reconstruction": t_quant}
    for key in ("quantize_s", "cholesky_s", "svd_s"):
        report.seconds[key.removesuffix("_s")] = sum(
            m.get(key, 0.0) for rec in report.layers for m in rec["linears"].values()
        )
    return report


def extra_params(model: nn.Module, value_bits: int = ADAPTER_VALUE_BITS) -> ExtraCost:
    """What the model's adapter would ship, counted on the tensors export writes for each
    quantized linear (L_B as lora_A, L_A as lora_B, side columns included), at ``value_bits``
    per value (the simulation runs in fp32; the checkpoint's dtype is what ships)."""
    shapes: list[tuple[Sequence[int], int]] = []
    weights = 0
    for mod in model.modules():
        if isinstance(mod, SimQuantLinear):
            weights += mod.out_features * mod.in_features
            shapes.extend((t.shape, value_bits) for t in (mod.L_A, mod.L_B) if t is not None)
    return extra_cost(shapes, weights)
