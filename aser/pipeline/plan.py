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
from aser.workers.calibration import EMBED_WEIGHT, expected_layer_tensors, hf_config

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
    if "quantization_config" in config_dict:
        raise PlanError(f"{storage.redact(source_url)} is already quantized (config.json has quantization_config)")
    hf = hf_config(config_dict)  # UnsupportedArchitecture (a ValueError) names the model_type
    groups_for(config_dict)
    index = sio.open_source(source_url)  # SafetensorsError names a missing shard / bad header
    num_layers = int(config_dict["num_hidden_layers"])
    layer_names: set[str] = set()
    for i in range(num_layers):
        prefix = layer_prefix(i)
        for rel in expected_layer_tensors(hf, i):
            name = prefix + rel
            if name not in index.tensors:
                raise PlanError(f"tensor {name} (layer {i}) is not in the source {storage.redact(source_url)}")
            layer_names.add(name)
    if EMBED_WEIGHT not in index.tensors:
        raise PlanError(f"tensor {EMBED_WEIGHT} is not in the source {storage.redact(source_url)}")
    embed = tuple(sorted(n for n in index.tensors if n.startswith("model.embed_tokens.")))
    # Tensors of layers >= num_hidden_layers or stale buffers (rotary inv_freq) are not carried.
    head = tuple(
        sorted(n for n in index.tensors if n not in embed and not n.startswith("model.layers."))
    )
    linears = tuple(lin for g in groups_for(config_dict) for lin in g.linears)
    return Plan(source_url, config_dict, num_layers, index, embed, head, linears)
