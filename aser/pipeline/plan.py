"""The plan of a run, from metadata only: the source's headers, its config, the stages.

Everything that can be checked without reading tensor data is checked here, before any work:
the architecture is supported, every shard and header is readable, every tensor each decoder
layer needs is in the source. The driver holds this object and nothing larger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aser.checkpoint import safetensors_io as sio
from aser.checkpoint import storage
from aser.pipeline import sources
from aser.pipeline.config import RunConfig
from aser.checkpoint.layers import layer_prefix
from aser.workers.arch import groups_for
from aser.workers.calibration import EMBED_WEIGHT, expected_layer_shapes, hf_config

CONFIG_NAME = "config.json"


class PlanError(ValueError):
    """The source cannot be quantized as it is; the message names the file or tensor."""


@dataclass(frozen=True)
class Plan:
    source_url: str  # resolved: a builtin name becomes its local directory
    config_dict: dict[str, Any]  # the source's config.json
    num_layers: int
    index: sio.SourceIndex  # headers only
    embed_names: tuple[str, ...]  # stage 0, copied
    head_names: tuple[str, ...]  # stage L + 1 (final norm, lm_head), copied
    linear_names: tuple[str, ...]  # per decoder layer, in groups_for order

    @property
    def fingerprint(self) -> dict[str, object]:
        """The tensors' fingerprint (``SourceIndex.fingerprint``) and the config's content: a
        changed ``rope_theta`` changes every layer's numbers as surely as a changed tensor."""
        canonical = json.dumps(self.config_dict, sort_keys=True, separators=(",", ":")).encode()
        return {**self.index.fingerprint(), "config_sha256": hashlib.sha256(canonical).hexdigest()}

    @property
    def hidden_size(self) -> int:
        return int(self.config_dict["hidden_size"])


# Buffers older checkpoints saved in each layer and transformers recomputes: not carried.
STALE_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
# Tensors outside the decoder layers whose shape config.json fixes (when the source has them).
HEAD_WEIGHT = "lm_head.weight"
NORM_WEIGHT = "model.norm.weight"


def _check_tensor(info: sio.TensorInfo, shape: tuple[int, ...], source_url: str) -> None:
    """A tensor the run computes with: floating point, and the shape config.json implies."""
    where = f"{info.file} in {storage.redact(source_url)}"
    if not sio.DTYPES[info.dtype].is_floating_point:
        raise PlanError(f"tensor {info.name} in {where} is {info.dtype}, not a floating-point type")
    if info.shape != shape:
        raise PlanError(f"tensor {info.name} in {where} has shape {list(info.shape)}; config.json implies {list(shape)}")


def _check_architectures(config_dict: dict[str, Any], config_url: str) -> None:
    """``architectures``, when given, must name the causal-LM class transformers maps the
    ``model_type`` to: a config whose two fields disagree is not one this run can trust."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs, model_type = config_dict.get("architectures"), config_dict.get("model_type")
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if archs is None or expected is None:
        return  # no claim to check; an unknown model_type is named by hf_config
    if not isinstance(archs, list) or expected not in archs:
        raise PlanError(f"{storage.redact(config_url)}: architectures {archs!r} does not name {expected}, "
                        f"the causal LM of model_type {model_type!r}")


def make_plan(config: RunConfig) -> Plan:
    try:
        source_url = sources.resolve_source(config.source)
    except (OSError, sources.SourceError) as e:
        raise PlanError(f"source {storage.redact(config.source)}: {e}") from e
    config_url = storage.join(source_url, CONFIG_NAME)
    try:
        config_dict = json.loads(storage.read_text(config_url))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read {storage.redact(config_url)}: {e}") from e
    if not isinstance(config_dict, dict):
        raise PlanError(f"{storage.redact(config_url)} is not a JSON object")
    _check_architectures(config_dict, config_url)
    if "quantization_config" in config_dict:
        raise PlanError(f"{storage.redact(source_url)} is already quantized (config.json has quantization_config)")
    hf = hf_config(config_dict)  # UnsupportedArchitecture (a ValueError) names the model_type
    groups_for(config_dict)
    index = sio.open_source(source_url)  # SafetensorsError names a missing shard / bad header
    num_layers = int(config_dict["num_hidden_layers"])
    layer_names: set[str] = set()
    for i in range(num_layers):
        prefix = layer_prefix(i)
        expected = expected_layer_shapes(hf, i)
        for rel, shape in expected.items():
            name = prefix + rel
            if name not in index.tensors:
                raise PlanError(f"tensor {name} (layer {i}) is not in the source {storage.redact(source_url)}")
            _check_tensor(index.tensors[name], shape, source_url)
            layer_names.add(name)
        # A tensor the layer class does not hold means another architecture (variant) than
        # config.json says; dropping it would write a different model. Stale rotary buffers are
        # the known exception.
        for name in index.names_with_prefix(prefix):
            if name not in layer_names and not name.endswith(STALE_BUFFER_SUFFIXES):
                info = index.tensors[name]
                raise PlanError(f"tensor {name} in {info.file} in {storage.redact(source_url)} is not a tensor of "
                                f"layer {i} as config.json's {type(hf).__name__.removesuffix('Config')} defines it")
    if EMBED_WEIGHT not in index.tensors:
        raise PlanError(f"tensor {EMBED_WEIGHT} is not in the source {storage.redact(source_url)}")
    vocab, hidden = int(hf.vocab_size), int(hf.hidden_size)
    _check_tensor(index.tensors[EMBED_WEIGHT], (vocab, hidden), source_url)
    for name, shape in ((HEAD_WEIGHT, (vocab, hidden)), (NORM_WEIGHT, (hidden,))):
        if name in index.tensors:
            _check_tensor(index.tensors[name], shape, source_url)
    embed = tuple(sorted(n for n in index.tensors if n.startswith("model.embed_tokens.")))
    # Tensors of layers >= num_hidden_layers or stale buffers (rotary inv_freq) are not carried.
    head = tuple(
        sorted(n for n in index.tensors if n not in embed and not n.startswith("model.layers."))
    )
    linears = tuple(lin for g in groups_for(config_dict) for lin in g.linears)
    return Plan(source_url, config_dict, num_layers, index, embed, head, linears)
