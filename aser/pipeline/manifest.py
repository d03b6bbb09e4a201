"""``aser_manifest.json``: provenance of a run and the state that makes resume exact.

The manifest records what produced the destination (source fingerprint, RunConfig, calibration
hash, library versions) and, per layer, what was written (file names, sizes, sha256) and
measured. A rerun loads it, refuses to continue if the source, the config or the calibration
data changed (naming what changed), and skips the layers already finished.

Calibration state at a layer boundary (each worker's hidden-state shard) is kept under
``DEST/.aser_state/`` so that an interrupted run resumes from the last finished layer instead of
recomputing the forward passes from the embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import aser
from aser.checkpoint import export, storage
from aser.checkpoint import safetensors_io as sio
from aser.pipeline.config import RunConfig
from aser.checkpoint.safetensors_io import INDEX_NAME
from aser.checkpoint.state import FileRecord, StateError

MANIFEST_NAME = "aser_manifest.json"
MANIFEST_VERSION = 1
# Fields that may change between an interrupted run and its resume without changing the bytes
# written: where the Ray cluster is, how often states are saved. (Worker count does change them:
# calibration is sharded.)
RESUME_IGNORED_FIELDS: frozenset[str] = frozenset({"ray_address", "save_state_every"})

LAYER_DONE = "done"


class ManifestError(StateError):
    """The destination's manifest is unreadable or belongs to a different run (a StateError:
    the corrupt calibration states of a run are the same kind of failure to resume)."""


@dataclass
class LayerRecord:
    """One stage of the run (a decoder layer; the driver may use negative or extra indices for
    the embedding and head stages)."""

    index: int
    status: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    # Per linear: {"rel_error_before": float, "rel_error_after": float, "rank": int, ...}
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: load, forward, svd, write
    bytes_read: int = 0
    bytes_written: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerRecord:
        return cls(
            index=int(d["index"]),
            status=str(d["status"]),
            files={k: FileRecord(**v) for k, v in d.get("files", {}).items()},
            metrics=dict(d.get("metrics", {})),
            seconds=dict(d.get("seconds", {})),
            bytes_read=int(d.get("bytes_read", 0)),
            bytes_written=int(d.get("bytes_written", 0)),
        )


@dataclass
class Manifest:
    source_url: str
    source_fingerprint: dict[str, Any]
    config: dict[str, Any]
    calibration_sha256: str | None
    versions: dict[str, str]
    layers: dict[int, LayerRecord] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    # Run-level figures written at the end (peak RSS per process, seconds per stage, totals).
    summary: dict[str, Any] = field(default_factory=dict)
    # The files finalize wrote (config, copied files, adapter, index), by name under DEST; the
    # stage shards are in ``layers``. Empty until the run is complete.
    final_files: dict[str, FileRecord] = field(default_factory=dict)
    # Per stage index: the content hash of the source bytes the stage was made from, as first
    # read (``safetensors_io.content_sha256``). Kept when a damaged stage's record is dropped:
    # the redo must read the same bytes (``safetensors_io.check_content``), which the store's
    # versions in ``source_fingerprint`` alone cannot promise (a store without versions, a file
    # rewritten in place with its mtime restored).
    source_content: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = {str(k): asdict(v) for k, v in sorted(self.layers.items())}
        d["source_content"] = {str(k): v for k, v in sorted(self.source_content.items())}
        d["source_url"] = storage.redact(self.source_url)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
            if d.get("manifest_version") != MANIFEST_VERSION:
                raise ManifestError(
                    f"manifest version {d.get('manifest_version')!r} is not {MANIFEST_VERSION}"
                )
            layers = {int(k): LayerRecord.from_dict(v) for k, v in d["layers"].items()}
            return cls(
                source_url=d["source_url"],
                source_fingerprint=d["source_fingerprint"],
                config=d["config"],
                calibration_sha256=d["calibration_sha256"],
                versions=d["versions"],
                layers=layers,
                summary=dict(d.get("summary", {})),
                final_files={k: FileRecord(**v) for k, v in d.get("final_files", {}).items()},
                source_content={int(k): str(v) for k, v in d.get("source_content", {}).items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{MANIFEST_NAME} is corrupt: {e}") from e

    def record_layer(self, record: LayerRecord) -> None:
        self.layers[record.index] = record

    def record_source_content(self, index: int, sha256: str | None, what: str) -> None:
        """Note the content hash of stage ``index``'s source bytes; raises SourceChanged if it
        differs from the one recorded when the run first read them."""
        if sha256 is None:
            return
        sio.check_content(what, self.source_content.get(index), sha256)
        self.source_content[index] = sha256

    def source_sha256(self) -> str | None:
        """One content hash of the source as the run read it (the stages' recorded so far; every
        stage's once the run is complete): the same for the same tensors however they are sharded."""
        if not self.source_content:
            return None
        lines = "".join(f"{k}\t{v}\n" for k, v in sorted(self.source_content.items()))
        return hashlib.sha256(lines.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    return {
        "aser": aser.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed-tensors": compressed_tensors.__version__,
    }


def calibration_sha256(token_ids: torch.Tensor) -> str:
    """Hash of the calibration token ids (shape and values): (num_samples, seq_len) integer."""
    t = token_ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _recorded_config(config: RunConfig) -> dict[str, Any]:
    """The config as the manifest records it: URLs without ``user:password@``, because the
    manifest is written to the destination, where anyone who can read the model reads it."""
    d = config.to_dict()
    d["source"], d["dest"] = storage.redact(d["source"]), storage.redact(d["dest"])
    if d["calib"].get("source"):
        d["calib"]["source"] = storage.redact(d["calib"]["source"])
    return d


def new_manifest(
    config: RunConfig, source_fingerprint: Mapping[str, Any], calibration_sha: str | None
) -> Manifest:
    return Manifest(
        source_url=config.source,
        source_fingerprint=dict(source_fingerprint),
        config=_recorded_config(config),
        calibration_sha256=calibration_sha,
        versions=library_versions(),
    )


def manifest_url(dest: str) -> str:
    return storage.join(dest, MANIFEST_NAME)


def load_manifest(dest: str) -> Manifest | None:
    """The destination's manifest, or None when the destination has none (a fresh run)."""
    url = manifest_url(dest)
    if not storage.exists(url):
        return None
    return Manifest.from_json(storage.read_text(url))


def save_manifest(dest: str, manifest: Manifest) -> None:
    storage.write_text_atomic(manifest_url(dest), manifest.to_json())


def is_finished(dest: str) -> bool:
    """A finished destination has its index, which finalize writes last."""
    return storage.exists(storage.join(dest, INDEX_NAME))


def is_complete(mf: Manifest | None, dest: str) -> bool:
    """Finished, and the run's bookkeeping after finalize done: the manifest records the final
    files. A run killed between finalize writing the index and the manifest's last save is not
    complete: its rerun finalizes again (the same bytes) and records them."""
    return mf is not None and bool(mf.final_files) and is_finished(dest)


def _diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out.extend(_diff_paths(old[k], new[k], path))
        return out
    return [] if old == new else [prefix]


def check_compatible(
    manifest: Manifest,
    config: RunConfig,
    source_fingerprint: Mapping[str, Any],
    calibration_sha: str | None,
    ignore: frozenset[str] = frozenset(),
) -> None:
    """Raise ManifestError naming what differs between the existing run and this one (top-level
    config fields in ``ignore`` are not compared, besides ``RESUME_IGNORED_FIELDS``)."""
    changed_source = _diff_paths(manifest.source_fingerprint, dict(source_fingerprint))
    if changed_source:
        raise ManifestError(
            f"the source changed since this destination was started ({', '.join(changed_source)} "
            "differ); use a new destination or restore the source"
        )
    new_config = json.loads(json.dumps(_recorded_config(config)))
    changed = [
        p
        for p in _diff_paths(manifest.config, new_config)
        if p.split(".", 1)[0] not in RESUME_IGNORED_FIELDS | ignore
    ]
    if changed:
        details = ", ".join(
            f"{p}: {_lookup(manifest.config, p)!r} -> {_lookup(new_config, p)!r}" for p in changed
        )
        raise ManifestError(
            f"the config differs from the one this destination was started with ({details}); "
            "rerun with the original config or use a new destination"
        )
    if manifest.calibration_sha256 != calibration_sha:
        raise ManifestError(
            "the calibration data differs from the one this destination was started with "
            f"(sha256 {manifest.calibration_sha256} -> {calibration_sha}); rerun with the same "
            "calib.source / num_samples / seq_len / seed or use a new destination"
        )


def _lookup(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return "<absent>"
        d = d[part]
    return d


def finished_layers(manifest: Manifest, dest: str) -> set[int]:
    """Layers recorded done whose files are all present with the recorded size.

    A layer whose file vanished or changed size is not finished: it is redone, and because
    names and bytes are deterministic the redo writes the same file.
    """
    done: set[int] = set()
    for idx, rec in manifest.layers.items():
        if rec.status != LAYER_DONE:
            continue
        ok = True
        for name, f in rec.files.items():
            url = storage.join(dest, name)
            if not storage.exists(url) or storage.size_bytes(url) != f.size_bytes:
                ok = False
                break
        if ok:
            done.add(idx)
    return done


# ---------------------------------------------------------------- what the adapter adds

# Bits per adapter value when none is stored to read it from: the adapter of a bf16/fp16
# checkpoint (export writes L_A and L_B in the weight's dtype).
ADAPTER_VALUE_BITS = 16


@dataclass(frozen=True)
class ExtraCost:
    """What the low-rank adapter adds to the INT4 base, counted on the tensors that ship.

    ``adapter_values``: numbers in the adapter's tensors — per module ``lora_A = L_B`` (r, K) and
    ``lora_B = L_A`` (N, r), where r includes ASER's exact side columns: each ships as a one-hot
    row of L_B plus a column of L_A, so it costs N + K like a rank of the low-rank path.
    ``adapter_bits``: their stored bits. ``quantized_weights``: Σ N·K over the quantized linears.
    Bits per weight = adapter_bits / quantized_weights. The weight scales are not counted: every
    method, rtn included, stores the same ones (one per output channel: 16/K bits per weight).
    """

    adapter_values: int
    adapter_bits: int
    quantized_weights: int

    @property
    def percent(self) -> float:
        """Adapter values as a percentage of the quantized weights' count."""
        return 100.0 * self.adapter_values / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.adapter_bits / self.quantized_weights if self.quantized_weights else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "adapter_values": self.adapter_values,
            "adapter_bits": self.adapter_bits,
            "quantized_weights": self.quantized_weights,
            "extra_params_pct": self.percent,
            "extra_bits_per_weight": self.bits_per_weight,
        }


def extra_cost(adapter: Iterable[tuple[Sequence[int], int]], quantized_weights: int) -> ExtraCost:
    """ExtraCost of adapter tensors given as (shape, bits per value)."""
    values = bits = 0
    for shape, value_bits in adapter:
        n = math.prod(shape)
        values += n
        bits += n * value_bits
    return ExtraCost(values, bits, quantized_weights)


def _num_codes(ckpt: sio.SourceIndex, module: str) -> int:
    """N·K of one quantized module of an output checkpoint: the int8 ``weight`` (int-quantized)
    holds one code per weight; pack-quantized stores the unpacked shape in ``weight_shape``."""
    if f"{module}.weight" in ckpt.tensors:
        return math.prod(ckpt.tensors[f"{module}.weight"].shape)
    shape = sio.read_tensors(ckpt, [f"{module}.weight_shape"])[f"{module}.weight_shape"]
    return math.prod(int(v) for v in shape.tolist())


def shipped_extra_cost(dest: str) -> ExtraCost:
    """ExtraCost of a finished output checkpoint, read from the headers of what was written (the
    adapter file and the base shards), at the adapter's stored dtype."""
    ckpt = sio.open_source(dest)
    weights = sum(
        _num_codes(ckpt, name.removesuffix(".weight_scale")) for name in ckpt.tensors if name.endswith(".weight_scale")
    )
    url = storage.join(dest, export.ADAPTER_DIR, export.ADAPTER_WEIGHTS_NAME)
    adapter = sio.open_file(url).tensors.values() if storage.exists(url) else ()
    bits = {name: torch.empty((), dtype=dt).element_size() * 8 for name, dt in sio.DTYPES.items()}
    return extra_cost(((info.shape, bits[info.dtype]) for info in adapter), weights)
