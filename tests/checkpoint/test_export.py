from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from tiny_llama import TINY

from aser.kernels.quant import dequantize_weight, fake_quantize_activation, quantize_weight
from aser.checkpoint import export
from aser.checkpoint import safetensors_io as sio
from aser.checkpoint.layers import layer_prefix

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class Lin:
    q: torch.Tensor
    scale: torch.Tensor
    L_A: torch.Tensor | None
    L_B: torch.Tensor | None


def _rank(layer: int, name: str) -> int:
    if (layer, name) == (1, "mlp.down_proj"):
        return 0  # a linear without correction: no LoRA module for it
    return 4 if name == "self_attn.q_proj" else 8  # unequal ranks: q_proj is zero-padded to 8


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 64, "tie_word_embeddings": False})
    model = AutoModelForCausalLM.from_config(config).eval()
    src = tmp_path_factory.mktemp("src")
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return src


def _export(src: Path, dest: Path, fmt: str, card: dict | None = None) -> dict[str, dict[str, Lin]]:
    return _export_url(str(src), str(dest), fmt, card=card)


@pytest.mark.parametrize("fmt, a_bits", [("w4a8", 8), ("w4a16", None)])
def test_transformers_and_peft_load_the_export(source: Path, tmp_path: Path, fmt: str, a_bits) -> None:
    from peft import PeftModel

    dest = tmp_path / "out"
    lins = _export(source, dest, fmt)
    files = sorted(p.name for p in dest.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    assert "generation_config.json" in files
    qcfg = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == ("int-quantized" if fmt == "w4a8" else "pack-quantized")
    assert qcfg["ignore"] == ["lm_head"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (4, "channel", True)

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        got = model(ids).logits
        ref_base = _ref_logits(source, lins, a_bits, lowrank=False, ids=ids)
        ref_full = _ref_logits(source, lins, a_bits, lowrank=True, ids=ids)
    # Same fp32 ops as transformers' CPU fake-quant path: equal up to summation order.
    torch.testing.assert_close(got, ref_base, atol=1e-5, rtol=1e-5)
    assert (ref_full - ref_base).abs().max() > 1e-3  # the adapter is not a no-op
    if a_bits is not None:
        # ... and the activation quantization is really applied by the loaded model.
        with torch.no_grad():
            ref_weight_only = _ref_logits(source, lins, None, lowrank=False, ids=ids)
        assert (ref_weight_only - got).abs().max() > 1e-4

    peft_model = PeftModel.from_pretrained(model, str(dest / export.ADAPTER_DIR)).eval()
    with torch.no_grad():
        got_full = peft_model(ids).logits
    torch.testing.assert_close(got_full, ref_full, atol=1e-5, rtol=1e-5)
    lora_modules = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(lora_modules) == 2 * len(LINEARS) - 1  # layer 1's down_proj has rank 0
    # One rank for every module (what vLLM serves), lora_alpha = r: q_proj's rank-4 pair is
    # zero-padded to 8, and the outputs above are unchanged by it.
    adapter_cfg = json.loads((dest / export.ADAPTER_DIR / export.ADAPTER_CONFIG_NAME).read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 8
    assert not adapter_cfg.get("rank_pattern") and not adapter_cfg.get("alpha_pattern")
    assert not adapter_cfg.get("use_rslora")
    shapes = {n: tuple(m.weight.shape) for n, m in peft_model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))}
    assert {s[0] for n, s in shapes.items() if "lora_A" in n} == {8}
    assert {s[1] for n, s in shapes.items() if "lora_B" in n} == {8}


def test_uniform_rank_padding_keeps_the_product_and_vllm_rank() -> None:
    g = torch.Generator().manual_seed(0)
    t = {"base_model.model.a.lora_A.weight": torch.randn(3, 5, generator=g),
         "base_model.model.a.lora_B.weight": torch.randn(7, 3, generator=g),
         "base_model.model.b.lora_A.weight": torch.randn(6, 5, generator=g),
         "base_model.model.b.lora_B.weight": torch.randn(4, 6, generator=g)}
    before = t["base_model.model.a.lora_B.weight"] @ t["base_model.model.a.lora_A.weight"]
    r, padded = export.uniform_rank({n: x.shape for n, x in t.items()})
    assert (r, padded) == (6, {"a": 3})
    t = {n: export.pad_lora(n, x, r) for n, x in t.items()}
    assert all(list(x.shape) == export.padded_shape(n, ref.shape, r) for (n, x), ref in zip(t.items(), [
        torch.empty(3, 5), torch.empty(7, 3), torch.empty(6, 5), torch.empty(4, 6)]))
    assert t["base_model.model.a.lora_A.weight"].shape == (6, 5) and t["base_model.model.a.lora_B.weight"].shape == (7, 6)
    torch.testing.assert_close(t["base_model.model.a.lora_B.weight"] @ t["base_model.model.a.lora_A.weight"], before)
    assert [export.vllm_max_lora_rank(k) for k in (1, 2, 8, 40, 320, 321, 513)] == [1, 8, 8, 64, 320, 512, None]


def test_merged_adapter_is_streamed_to_the_librarys_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Parts of two ranks (one padded), bf16: the adapter finalize streams layer by layer is the
    # file safetensors writes for the merged, padded tensors held at once; each part is read
    # once, in one call (one range request), not once per tensor.
    g = torch.Generator().manual_seed(0)
    parts = {1: {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(3, 8, generator=g),
                 "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.randn(5, 3, generator=g)},
             2: {"base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(4, 8, generator=g),
                 "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": torch.randn(5, 4, generator=g)}}
    dest, written = str(tmp_path), {}
    for stage, t in parts.items():
        export.write_stage(dest, stage, 2, {"x": torch.zeros(1)}, {n: v.to(torch.bfloat16) for n, v in t.items()})
    reads: list[list[str]] = []
    read_tensors = sio.read_tensors

    def counted(src, names, *args):
        reads.append(sorted(names))
        return read_tensors(src, names, *args)

    monkeypatch.setattr(sio, "read_tensors", counted)
    info = export._write_adapter(dest, [export.adapter_part_name(s) for s in parts], written)
    assert reads == [sorted(t) for t in parts.values()]
    assert (info["rank"], info["padded"]) == (4, {"model.layers.0.mlp.down_proj": 3})
    merged = {n: export.pad_lora(n, v.to(torch.bfloat16), 4) for t in parts.values() for n, v in t.items()}
    path = tmp_path / export.ADAPTER_DIR / export.ADAPTER_WEIGHTS_NAME
    assert path.read_bytes() == sio.shard_bytes(merged)
    assert written[f"{export.ADAPTER_DIR}/{export.ADAPTER_WEIGHTS_NAME}"].size_bytes == path.stat().st_size


def _ref_logits(src: Path, lins, a_bits, lowrank: bool, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for prefix, layer in lins.items():
        for name, lin in layer.items():
            module = model.get_submodule(f"{prefix}{name}")
            W = dequantize_weight(lin.q, lin.scale)

            def forward(x, W=W, lin=lin, bias=module.bias):
                xq = x if a_bits is None else fake_quantize_activation(x, a_bits)
                y = torch.nn.functional.linear(xq, W, bias)
                if lowrank and lin.L_A is not None:
                    y = y + (x @ lin.L_B.T) @ lin.L_A.T  # the low-rank path reads unquantized x
                return y

            module.forward = forward
    return model(ids).logits


def test_export_is_byte_identical_across_runs(source: Path, tmp_path: Path) -> None:
    _export(source, tmp_path / "a", "w4a8")
    _export(source, tmp_path / "b", "w4a8")
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(str(n).endswith(".safetensors") for n in names)
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_bad_inputs_are_refused() -> None:
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(export.ExportError, match="scale shape"):
        export.compress_linear(q, torch.ones(4, 2), "w4a8", None)
    with pytest.raises(export.ExportError, match="INT4 range"):
        export.compress_linear(q + 9, torch.ones(4, 1), "w4a8", None)
    with pytest.raises(export.ExportError, match="already quantized"):
        export.output_config({"quantization_config": {}}, "w4a8", None)
    with pytest.raises(export.ExportError, match="unknown output format"):
        export.quantization_scheme("w3a3", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["w4a8", "w4a16"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressor_keeps_our_codes_and_scales(fmt: str, group_size, dtype) -> None:
    from compressed_tensors.compressors import BaseCompressor

    W = torch.randn(24, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    W[3] = 0  # a zero row: scale eps, codes 0
    q, scale = quantize_weight(W, 4, group_size)
    out = export.compress_linear(q, scale, fmt, group_size)  # type: ignore[arg-type]
    assert out["weight_scale"].dtype == dtype and torch.equal(out["weight_scale"], scale)
    compressor = BaseCompressor.get_value_from_registry(export._COMPRESSION_FORMAT[fmt])
    back = compressor.decompress(out, export.quantization_scheme(fmt, group_size))  # type: ignore[arg-type]
    torch.testing.assert_close(back["weight"].float(), dequantize_weight(q, scale, group_size).float(), atol=0, rtol=0)


def test_export_to_s3_equals_local(source: Path, tmp_path: Path, s3_bucket: str) -> None:
    import s3fs

    from aser.checkpoint import storage

    # The S3 leg goes through the same code with URLs instead of paths.
    src_url = storage.join(s3_bucket, "src")
    for p in source.iterdir():
        storage.write_bytes_atomic(storage.join(src_url, p.name), p.read_bytes())
    dest_url = storage.join(s3_bucket, "out")
    local = tmp_path / "local"
    _export(source, local, "w4a16")
    _export_url(src_url, dest_url, "w4a16")
    fs = s3fs.S3FileSystem()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            rel = p.relative_to(local).as_posix()
            assert fs.cat_file(f"{dest_url[5:]}/{rel}") == p.read_bytes(), rel


def _export_url(src: str, dest: str, fmt: str, shard_size_bytes: int | None = None,
                card: dict | None = None) -> dict[str, dict[str, Lin]]:
    """What the driver does, with round-to-nearest and random low-rank factors."""
    from aser.checkpoint import storage

    source = sio.open_source(src)
    L = json.loads(storage.read_text(storage.join(src, "config.json")))["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    export.write_stage(dest, 0, L, sio.read_tensors(source, ["model.embed_tokens.weight"]))
    parts = []
    all_lins = {}
    for i in range(L):
        prefix = layer_prefix(i)
        fp = {n[len(prefix):]: t for n, t in sio.read_tensors(source, source.names_with_prefix(prefix)).items()}
        lins = {}
        for name in LINEARS:
            W = fp[f"{name}.weight"]
            q, scale = quantize_weight(W, 4)
            r = _rank(i, name)
            L_A = 0.02 * torch.randn(W.shape[0], r, generator=g) if r else None
            L_B = 0.02 * torch.randn(r, W.shape[1], generator=g) if r else None
            lins[name] = Lin(q, scale, L_A, L_B)
        base, adapter = export.layer_tensors(prefix, fp, lins, fmt, None)  # type: ignore[arg-type]
        parts += [f for f in export.write_stage(dest, 1 + i, L, base, adapter, shard_size_bytes) if f.startswith(export.ADAPTER_PARTS_DIR)]
        all_lins[prefix] = lins
    export.write_stage(dest, L + 1, L, sio.read_tensors(source, ["model.norm.weight", "lm_head.weight"]))
    export.finalize(dest, src, L, fmt, None, parts, card or CARD)  # type: ignore[arg-type]
    return all_lins



def test_a_base_that_holds_its_outlier_columns_still_needs_its_adapter(source: Path, tmp_path: Path) -> None:
    # Measured on SmolLM2-135M (benchmarks/base_layouts.py): no layout made the base alone usable.
    dest = tmp_path / "out"
    _export(source, dest, "w4a8", card={**CARD, "method": {**CARD["method"], "base_outliers": "clipped"}})
    body = (dest / export.MODEL_CARD_NAME).read_text()
    assert "**The base needs its adapter.**" in body and "`base_outliers` = clipped" in body
    assert export.REQUIRES_ADAPTER_KEY in json.loads((dest / "config.json").read_text())


CARD = {"aser_version": "0.1.0", "method": {"method": "aser", "rank": 8, "w_bits": 4, "a_bits": 8},
        "calibration": {"num_samples": 12, "seq_len": 64, "tokens_sha256": "ab" * 32}}


@pytest.mark.parametrize("fmt", ["w4a8", "w4a16", "w4a8-marlin"])
def test_the_model_cards_python_loads_the_model_with_its_adapter(source: Path, tmp_path: Path, fmt: str) -> None:
    """The card's transformers + PEFT lines, run as written: pack-quantized bases stay
    compressed in transformers >= 5 until a first forward unless loaded dense, and PEFT needs
    a Linear's weight."""
    dest = tmp_path / "out"
    lins = _export(source, dest, fmt)
    card = (dest / export.MODEL_CARD_NAME).read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_DIR", str(dest))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own snippet
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = scope["model"].eval()(ids).logits
        ref = _ref_logits(source, lins, 8 if fmt == "w4a8" else None, lowrank=True, ids=ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["w4a8", "w4a16", "w4a8-marlin"])
def test_model_card_and_config_say_the_base_needs_its_adapter(source: Path, tmp_path: Path, fmt: str) -> None:
    import yaml

    dest = tmp_path / "out"
    _export(source, dest, fmt)
    card = (dest / export.MODEL_CARD_NAME).read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and {"quantized", "aser", fmt, "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # the tiny source has no hub id
    assert "**The base needs its adapter.**" in body
    assert "--enable-lora --lora-modules aser=THIS_DIR/aser_adapter --max-lora-rank 8" in body
    assert ("no CUDA kernel" in body) == (fmt == "w4a8")
    assert ("VLLM_MARLIN_INPUT_DTYPE=int8 VLLM_DISABLED_KERNELS=MacheteLinearKernel vllm serve" in body) == (fmt == "w4a8-marlin")
    assert ("PR #38066" in body) == (fmt == "w4a8-marlin")  # per-channel INT8 Marlin: not in every vLLM
    assert ("`--format w4a8-int` for vLLM on CPUs" in body) == (fmt != "w4a8")  # the CPU build lacks the op
    assert CARD["calibration"]["tokens_sha256"] in body and "| rank | 8 |" in body
    assert str(tmp_path) not in card and str(source) not in card  # the same card whatever the DEST
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg[export.REQUIRES_ADAPTER_KEY]["adapter"] == export.ADAPTER_DIR


def test_split_stages_load_like_whole_ones(source: Path, tmp_path: Path) -> None:
    _export(source, tmp_path / "whole", "w4a8")
    _export_url(str(source), str(tmp_path / "split"), "w4a8", shard_size_bytes=8192)
    parts = sorted(p.name for p in (tmp_path / "split").glob("model-00002-of-00004-part*"))
    assert len(parts) > 1 and parts[0] == f"model-00002-of-00004-part001-of{len(parts):03d}.safetensors"
    index = json.loads((tmp_path / "split" / sio.INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) >= set(parts)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "split").eval()(ids).logits
    assert torch.equal(a, b)


def test_split_by_size_is_greedy_and_total() -> None:
    t = {n: torch.zeros(k) for n, k in [("a", 10), ("b", 10), ("c", 30), ("d", 1)]}  # 4 bytes each
    pieces = export.split_by_size(t, 80)
    assert [sorted(p) for p in pieces] == [["a", "b"], ["c"], ["d"]]


def test_finalize_refuses_a_missing_stage(source: Path, tmp_path: Path) -> None:
    _export(source, tmp_path, "w4a16")
    (tmp_path / sio.INDEX_NAME).unlink()
    (tmp_path / export.stage_shard_name(2, 2)).unlink()
    with pytest.raises(export.ExportError, match=r"model-00003-of-00004.safetensors \(stage 2\) is missing"):
        export.finalize(str(tmp_path), str(source), 2, "w4a16", None, [])
    assert not (tmp_path / sio.INDEX_NAME).exists()
