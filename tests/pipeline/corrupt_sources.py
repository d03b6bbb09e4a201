"""Corrupted sources made from a valid small checkpoint (stories260K), one kind of damage each.

``CASES`` maps a case name to (damage, expected): ``damage(src)`` corrupts a copy of the
checkpoint in place; ``expected`` is a regular expression the one-line error must match — it
names the file (or tensor) and the cause. ``needs_data`` cases are found only when the tensor
data is read (a Ray run); the rest before anything starts.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
Q = "model.layers.1.self_attn.q_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"
GATE = "model.layers.2.mlp.gate_proj.weight"
EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Case:
    damage: Callable[[Path], None]
    expected: str
    needs_data: bool = False


# ------------------------------------------------------------------ helpers on one file


def _split(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit model.safetensors' header (the data section kept as it is)."""

    def damage(src: Path) -> None:
        header, data = _split(src / MODEL)
        edit(header)
        _join(src / MODEL, header, data)

    return damage


def _raw(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / MODEL).write_bytes(edit((src / MODEL).read_bytes()))

    return damage


def _state(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Edit the tensors and save a well-formed file (the damage is in what it holds)."""

    def damage(src: Path) -> None:
        state = load_file(str(src / MODEL))
        edit(state)
        save_file(state, str(src / MODEL), metadata={"format": "pt"})

    return damage


def _config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))

    return damage


def _last_by_offset(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _gap(src: Path) -> None:
    # Four unused bytes before the last tensor: every offset still inside the file.
    header, data = _split(src / MODEL)
    last = _last_by_offset(header)
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    _join(src / MODEL, header, data[:begin] + b"\0" * 4 + data[begin:])


def _overlap(h: dict) -> None:
    h[V]["data_offsets"] = list(h[K]["data_offsets"])  # same shape, same bytes claimed twice


def _swap_q_and_gate_offsets(h: dict) -> None:
    # Out of order: two tensors of different sizes trade places in the header only.
    h[Q]["data_offsets"], h[GATE]["data_offsets"] = h[GATE]["data_offsets"], h[Q]["data_offsets"]


def _lying_dtype(h: dict) -> None:
    # A header that lies: q_proj (F32 64 x 64) claimed as F16 64 x 128, byte-consistent.
    h[Q]["dtype"], h[Q]["shape"] = "F16", [64, 128]


def _set(name: str, field: str, value: object) -> Callable[[dict], None]:
    def edit(h: dict) -> None:
        h[name][field] = value

    return edit


def _del(name: str, field: str | None = None) -> Callable[[dict], None]:
    def edit(h: dict) -> None:
        if field is None:
            del h[name]
        else:
            del h[name][field]

    return edit


# ------------------------------------------------------------------ helpers on a sharded copy


def _sharded(edit: Callable[[Path, dict], None] | None = None) -> Callable[[Path], None]:
    """Split into two shards plus an index (layers 0-2 first), then ``edit(src, index)``."""

    def damage(src: Path) -> None:
        state = load_file(str(src / MODEL))
        (src / MODEL).unlink()
        first = {k: v for k, v in state.items() if any(k.startswith(f"model.layers.{i}.") for i in range(3))}
        parts = {SHARDS[0]: first, SHARDS[1]: {k: v for k, v in state.items() if k not in first}}
        weight_map = {}
        for name, part in parts.items():
            save_file(part, str(src / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        index = {"metadata": {}, "weight_map": weight_map}
        if edit is not None:
            edit(src, index)
        if (src / INDEX).exists():
            return
        (src / INDEX).write_text(json.dumps(index))

    return damage


def _index_text(text: str) -> Callable[[Path, dict], None]:
    def edit(src: Path, index: dict) -> None:
        (src / INDEX).write_text(text)

    return edit


def _index(fn: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def edit(src: Path, index: dict) -> None:
        fn(index)

    return edit


def _remove(name: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / name).unlink()

    return damage


def _write(name: str, text: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / name).write_text(text)

    return damage


def _nan(t: torch.Tensor) -> None:
    t[3, 5] = float("nan")


def _inf(t: torch.Tensor) -> None:
    t[7, 1] = float("inf")


F = r"model\.safetensors"
CFG = r"config\.json"
IDX = r"model\.safetensors\.index\.json"

CASES: dict[str, Case] = {
    # The file and its header.
    "file-shorter-than-the-length-field": Case(_raw(lambda b: b[:5]), F + r" is truncated: 5 bytes"),
    "header-length-past-the-end": Case(_raw(lambda b: struct.pack("<Q", len(b)) + b[8:]),
                                       F + r" has a corrupt or truncated header"),
    "header-length-absurd": Case(_raw(lambda b: struct.pack("<Q", 1 << 62) + b[8:]), F + r" has a corrupt or truncated"),
    "header-not-json": Case(_raw(lambda b: b[:8] + b"{" * struct.unpack("<Q", b[:8])[0] + b[8 + struct.unpack("<Q", b[:8])[0]:]),
                            F + r" has a corrupt header"),
    "header-not-utf8": Case(_raw(lambda b: b[:8] + b"\xff" + b[9:]), F + r" has a corrupt header"),
    "header-a-json-array": Case(_raw(lambda b: b[:8] + b"[" + b" " * (struct.unpack("<Q", b[:8])[0] - 2) + b"]"
                                     + b[8 + struct.unpack("<Q", b[:8])[0]:]), F + r" has a corrupt header: not a JSON object"),
    "metadata-not-an-object": Case(_header(lambda h: h.__setitem__("__metadata__", ["format", "pt"])),
                                   F + r" has a corrupt header: __metadata__ is not a JSON object"),
    "entry-without-offsets": Case(_header(_del(Q, "data_offsets")), F + r": corrupt header entry for tensor " + Q),
    "entry-not-an-object": Case(_header(lambda h: h.__setitem__(Q, "F32")), F + r": corrupt header entry for tensor " + Q),
    "dtype-unknown": Case(_header(_set(Q, "dtype", "F12")), F + r": tensor " + Q + r" has unsupported dtype F12"),
    "dtype-integer": Case(_header(_set(Q, "dtype", "I32")), Q + r" in " + F + r" .* is I32, not a floating-point type"),
    "shape-not-integers": Case(_header(_set(Q, "shape", ["64", 64])), F + r": tensor " + Q + r" has a malformed shape"),
    "shape-negative": Case(_header(_set(Q, "shape", [-64, -64])), F + r": tensor " + Q + r" has a malformed shape"),
    "offsets-not-integers": Case(_header(_set(Q, "data_offsets", [0.5, 16384.5])), F + r": tensor " + Q + r" has a malformed"),
    "offsets-reversed": Case(_header(lambda h: h[Q].__setitem__("data_offsets", h[Q]["data_offsets"][::-1])),
                             F + r": tensor " + Q + r" .* has data offsets .* inconsistent"),
    "offsets-size-mismatch": Case(_header(_set(Q, "shape", [64, 63])), F + r": tensor " + Q + r" .* inconsistent with its size"),
    "offsets-past-the-end": Case(_header(lambda h: h[_last_by_offset(h)].__setitem__(
        "data_offsets", [o + 256 for o in h[_last_by_offset(h)]["data_offsets"]])), F + r": tensor .* inconsistent with .* file size"),
    "offsets-overlap": Case(_header(_overlap), F + r": tensor model\.layers\.1\.self_attn\.[kv]_proj\.weight's data offsets overlaps"),
    "offsets-out-of-order": Case(_header(_swap_q_and_gate_offsets), F + r": tensor .* (inconsistent|data offsets (overlaps|leaves a gap))"),
    "offsets-gap": Case(_gap, F + r": tensor .*'s data offsets leaves a gap of 4 bytes"),
    "trailing-bytes": Case(_raw(lambda b: b + b"\0" * 16), F + r": 16 bytes after the last tensor's data"),
    "data-truncated": Case(_raw(lambda b: b[: len(b) * 3 // 4]), F + r": tensor .* inconsistent with .* file size"),
    "header-lies-about-dtype": Case(_header(_lying_dtype), Q + r" in " + F + r" .* has shape \[64, 128\]; config\.json implies \[64, 64\]"),
    # The tensors.
    "shape-contradicts-config": Case(_state(lambda s: s.__setitem__(K, torch.zeros(16, 64))),
                                     K + r" in " + F + r" .* has shape \[16, 64\]; config\.json implies \[32, 64\]"),
    "embedding-rows-contradict-vocab": Case(_state(lambda s: s.__setitem__(EMBED, torch.zeros(500, 64))),
                                            EMBED + r" in " + F + r" .* config\.json implies \[512, 64\]"),
    "layer-tensor-missing": Case(_state(lambda s: s.pop(V)), V + r" \(layer 1\) is not in the source"),
    "embedding-missing": Case(_state(lambda s: s.pop(EMBED)), EMBED + r" is not in the source"),
    "unknown-tensor-in-a-layer": Case(_state(lambda s: s.__setitem__("model.layers.2.mlp.extra_proj.weight", torch.zeros(4, 4))),
                                      r"model\.layers\.2\.mlp\.extra_proj\.weight in " + F + r" .* is not a tensor of layer 2"),
    "nan-in-a-layer": Case(_state(lambda s: _nan(s[GATE])), GATE + r" in .*" + F + r" contains NaN", needs_data=True),
    "inf-in-the-embedding": Case(_state(lambda s: _inf(s[EMBED])), EMBED + r" in .*" + F + r" contains Inf", needs_data=True),
    # config.json.
    "config-missing": Case(_remove("config.json"), r"src has no config\.json: not a Hugging Face checkpoint"),
    "config-not-json": Case(_write("config.json", "{\"model_type\": \"llama\","), r"cannot read .*" + CFG),
    "config-an-array": Case(_write("config.json", "[1, 2]"), CFG + r" is not a JSON object"),
    "config-without-model-type": Case(_config(lambda c: c.pop("model_type")), CFG + r" has no model_type"),
    "config-unknown-model-type": Case(_config(lambda c: c.__setitem__("model_type", "no-such-model")), r"no-such-model"),
    "config-wrong-architectures": Case(_config(lambda c: c.__setitem__("architectures", ["BertForMaskedLM"])),
                                       CFG + r": architectures \['BertForMaskedLM'\] does not name LlamaForCausalLM"),
    "config-wrong-hidden-size": Case(_config(lambda c: c.update(hidden_size=96, head_dim=12)),
                                     r"in " + F + r" .* has shape .*; config\.json implies"),
    "config-more-layers-than-the-weights": Case(_config(lambda c: c.__setitem__("num_hidden_layers", 6)),
                                                r"model\.layers\.5\..* \(layer 5\) is not in the source"),
    "config-already-quantized": Case(_config(lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq"})),
                                     r"is already quantized \(config\.json has quantization_config\)"),
    # The index of a sharded checkpoint.
    "index-not-json": Case(_sharded(_index_text("{\"weight_map\": ")), IDX + r" is not a valid index"),
    "index-without-weight-map": Case(_sharded(_index_text("{\"metadata\": {}}")), IDX + r" is not a valid index"),
    "index-weight-map-a-list": Case(_sharded(_index(lambda i: i.__setitem__("weight_map", list(i["weight_map"])))),
                                    IDX + r" is not a valid index: weight_map must map"),
    "index-path-outside-the-source": Case(_sharded(_index(lambda i: i["weight_map"].__setitem__(Q, "../" + SHARDS[0]))),
                                          IDX + r" is not a valid index: weight_map must map"),
    "index-names-a-missing-shard": Case(_sharded(_index(lambda i: i["weight_map"].__setitem__(Q, "model-00003-of-00003.safetensors"))),
                                        r"shard .*model-00003-of-00003\.safetensors is missing"),
    "index-puts-a-tensor-in-the-wrong-shard": Case(_sharded(_index(lambda i: i["weight_map"].__setitem__(Q, SHARDS[1]))),
                                                   Q + r" is listed in " + IDX + r" under " + SHARDS[1].replace(".", r"\.")
                                                   + r" but missing from that shard"),
    "shard-deleted": Case(_sharded(lambda src, i: (src / SHARDS[1]).unlink()),
                          r"shard .*" + SHARDS[1].replace(".", r"\.") + r" is missing"),
    "no-weights-at-all": Case(_remove(MODEL), r"has neither " + IDX + r" nor " + F),
    # The tokenizer (calibration text is tokenized with it).
    "tokenizer-missing": Case(lambda src: [(src / n).unlink() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")],
                              r"cannot load the tokenizer of .*src \(tokenizer files found: none\)"),
    "tokenizer-corrupt": Case(lambda src: [(src / "tokenizer.json").write_text("{not json"), (src / "tokenizer.model").unlink()],
                              r"cannot load the tokenizer of .*src \(tokenizer files found: tokenizer\.json, tokenizer_config\.json\)"),
}
