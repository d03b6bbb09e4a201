"""load_aser_model / evaluate_dest: a hand-written DEST (per the output spec) loads into a
transformers model of AserLinear and reproduces the fake-quantized simulation."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from aser_dest_writer import (
    LINEARS,
    AdapterScaling,
    FakeQuantLinear,
    QuantizedPieces,
    fake_quant_model,
    write_dest,
)
from kernel_tolerances import rel_err, tol
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from aser.kernels.linear import AserLinear
from aser.kernels.quant import dequantize_weight
from aser.kernels.loader import AserLoadError, load_aser_model
from aser.pipeline.evaluate import evaluate_dest
from aser.pipeline import data, evaluate


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # intermediate 100: down_proj's K is not a multiple of 8 (a partial packed word)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _ranks(model) -> dict[str, int]:
    # different ranks per linear: the test writer's adapter_config carries a rank_pattern (the
    # loader reads other tools' adapters too); export pads them to one rank
    return {f"model.layers.{i}.{lin}": (4 if lin.endswith(("q_proj", "down_proj")) else 2)
            for i in range(model.config.num_hidden_layers) for lin in LINEARS}


def _linear_io(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each named module's (input, output) during one forward pass of ``model`` on ``ids``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, args, out, n=n: seen.__setitem__(n, (args[0], out))) for n in names]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _assert_linear_matches_simulation(name: str, x: torch.Tensor, y: torch.Tensor,
                                      p: QuantizedPieces, a_bits: int | None) -> None:
    """Teacher forcing: y (a linear's output inside the model) against the simulation of that
    linear on the very same input x. End to end, an fp32-vs-fp64 difference that moves one
    activation across an INT8 rounding boundary upstream changes everything downstream by as
    much as W4A8 differs from W4A16; on a shared input the two agree to rounding. The bound
    must also separate the other scheme and the adapter-free linear on this data."""
    bound = tol("e2e_per_linear")
    sim = FakeQuantLinear(p, a_bits).simulate(x)
    assert rel_err(y, sim) <= bound, name
    other_scheme = FakeQuantLinear(p, None if a_bits == 8 else 8).simulate(x)
    assert rel_err(other_scheme, sim) > 100 * bound, name
    if p.L_A is not None:
        no_adapter = FakeQuantLinear(replace(p, L_A=None, L_B=None), a_bits).simulate(x)
        assert rel_err(no_adapter, sim) > 100 * bound, name


@pytest.mark.parametrize("a_bits", [8, None])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_end_to_end_matches_fake_quant(tiny_model, tmp_path: Path, a_bits, backend):
    pieces = write_dest(tiny_model, tmp_path, a_bits, _ranks(tiny_model))
    model = load_aser_model(str(tmp_path), backend=backend)
    lin = model.model.layers[1].mlp.down_proj
    assert isinstance(lin, AserLinear) and lin.rank == 4 and lin.a_bits == a_bits
    assert not isinstance(model.lm_head, AserLinear)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    for name, (x, y) in _linear_io(model, ids, sorted(pieces)).items():
        _assert_linear_matches_simulation(name, x, y, pieces[name], a_bits)
    with torch.no_grad():
        out = model(ids).logits
        sim = fake_quant_model(tiny_model, pieces, a_bits)(ids).logits
        fp = tiny_model(ids).logits
    # Logits: the non-quantized parts (embeddings, norms, head) are wired as in transformers.
    if a_bits == 8:
        quant_error = float((fp.double() - sim.double()).abs().max())
        assert quant_error > 0
        assert float((out.double() - sim.double()).abs().max()) <= tol("e2e_w4a8_vs_quant_error") * quant_error
    else:
        assert rel_err(out, sim) <= tol("e2e_w4a16")


# (every linear at rank 4?, PEFT's scaling fields): lora_alpha != r; an alpha_pattern where a
# later, more specific key also matches (PEFT takes the first match); rank-stabilised LoRA.
SCALINGS = {
    "lora_alpha": (True, AdapterScaling(lora_alpha=16.0)),
    "alpha_pattern": (False, AdapterScaling(lora_alpha=6.0, alpha_pattern={
        "q_proj": 3.0, "layers.1.self_attn.q_proj": 20.0, "down_proj": 10.0})),
    "rslora": (False, AdapterScaling(lora_alpha=8.0, alpha_pattern={"down_proj": 3.0},
                                     use_rslora=True)),
}


@pytest.mark.parametrize("case", SCALINGS)
def test_adapter_scaling_matches_peft(tiny_model, tmp_path: Path, case):
    """The loader folds PEFT's scaling (alpha / r, alpha / sqrt(r) with rslora, alpha_pattern)
    into L_A: the loaded model equals PEFT applying the same adapter files to the dequantized
    base. W4A16, so no activation rounding: the logits agree to fp32 rounding."""
    uniform, scaling = SCALINGS[case]
    ranks = {n: 4 for n in _ranks(tiny_model)} if uniform else _ranks(tiny_model)
    pieces = write_dest(tiny_model, tmp_path, None, ranks, scaling=scaling)
    base = copy.deepcopy(tiny_model)
    for name, p in pieces.items():
        base.get_submodule(name).weight.data = dequantize_weight(p.q, p.scale)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "aser_adapter")).eval()
    peft_scalings = {n: peft_model.base_model.model.get_submodule(n).scaling["default"] for n in pieces}
    assert peft_scalings == pytest.approx({n: scaling.scaling(n, ranks[n]) for n in pieces})
    assert min(abs(math.log(v)) for v in peft_scalings.values()) > 0.1  # no module at scaling 1
    ours = load_aser_model(str(tmp_path), backend="torch")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    for name, (x, y) in _linear_io(ours, ids, sorted(pieces)).items():
        _assert_linear_matches_simulation(name, x, y, pieces[name], None)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, peft_model(ids).logits) <= tol("e2e_w4a16")


@pytest.mark.parametrize("a_bits", [8, None])
def test_transformers_reads_the_same_checkpoint(tiny_model, tmp_path: Path, a_bits):
    """Rank 0: transformers' own compressed-tensors loader and ours agree, so the layout the
    tests write (and the loader reads) is the one compressed-tensors defines."""
    pieces = write_dest(tiny_model, tmp_path, a_bits, {})
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(2))
    ours_model = load_aser_model(str(tmp_path), backend="torch")
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for name, (x, y_hf) in _linear_io(hf_model, ids, sorted(pieces)).items():
        with torch.no_grad():
            y = ours_model.get_submodule(name)(x)
        assert rel_err(y, y_hf) <= tol("e2e_per_linear"), name
        _assert_linear_matches_simulation(name, x, y, pieces[name], a_bits)
    with torch.no_grad():
        ours = ours_model(ids).logits
        hf = hf_model(ids).logits
        fp = tiny_model(ids).logits
    if a_bits == 8:
        quant_error = float((fp.double() - hf.double()).abs().max())
        assert float((ours.double() - hf.double()).abs().max()) <= tol("e2e_w4a8_vs_quant_error") * quant_error
    else:
        assert rel_err(ours, hf) <= tol("e2e_w4a16")


def test_clear_errors(tiny_model, tmp_path: Path):
    write_dest(tiny_model, tmp_path, 8, {"model.layers.0.self_attn.q_proj": 2})
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = dict(cfg, quantization_config=dict(cfg["quantization_config"], format="float-quantized"))
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(AserLoadError, match="format"):
        load_aser_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    adapter = tmp_path / "aser_adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    t = load_file(str(adapter))
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    t["base_model.model.lm_head.lora_B.weight"] = torch.zeros(256, 2)
    save_file(t, str(adapter))
    with pytest.raises(AserLoadError, match="lm_head"):
        load_aser_model(str(tmp_path))


def test_evaluate_dest_on_stories260k(stories_dir: Path, data_dir: Path, tmp_path: Path):
    """A real tiny model (tied embeddings, GQA) and its tokenizer: evaluate_dest's perplexity
    equals the fake-quantized simulation's on the same windows."""
    fp = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    ranks = {f"model.layers.{i}.{lin}": 4 for i in range(fp.config.num_hidden_layers) for lin in LINEARS}
    pieces = write_dest(fp, tmp_path, 8, ranks)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((stories_dir / name).read_bytes())
    (tmp_path / "aser_manifest.json").write_text(json.dumps({"config": {"method": {"method": "er", "rank": 4}}}))
    text = data_dir / "tinystories" / "sample.txt"
    out = evaluate_dest(str(tmp_path), str(text), seq_len=128, max_windows=4)
    assert {"method", "rank", "w_bits", "a_bits", "seq_len", "ppl", "num_windows", "seconds"} <= set(out)
    assert (out["method"], out["rank"], out["w_bits"], out["a_bits"]) == ("er", 4, 4, 8)
    assert out["num_windows"] == 4 and out["seq_len"] == 128
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    windows = data.eval_windows(data.tokenize(tok, text.read_text()), 128, 4)
    sim_ppl = evaluate.perplexity(fake_quant_model(fp, pieces, 8), windows)
    fp_ppl = evaluate.perplexity(fp, windows)
    assert math.isfinite(out["ppl"]) and out["ppl"] > 1
    assert abs(out["ppl"] - sim_ppl) <= tol("ppl_vs_quant_effect") * abs(sim_ppl - fp_ppl)


def _export_like_finalize(tiny_model, pieces: dict[str, QuantizedPieces], theirs: Path, fmt: str) -> None:
    """What aser/checkpoint/export.py writes for these pieces (per-layer tensors, config, the
    adapter padded to one rank), in one file."""
    from safetensors.torch import save_file

    from aser.checkpoint import export

    (theirs / "aser_adapter").mkdir(parents=True)
    sd = tiny_model.state_dict()
    base: dict[str, torch.Tensor] = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    adapter: dict[str, torch.Tensor] = {}
    for i in range(tiny_model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        fp = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        lins = {lin: pieces[prefix + lin] for lin in LINEARS}
        b, a = export.layer_tensors(prefix, fp, lins, fmt, None)
        base.update(b)
        adapter.update(a)
    save_file({k: v.contiguous() for k, v in base.items()}, str(theirs / "model.safetensors"))
    cfg = export.output_config(tiny_model.config.to_dict(), fmt, None)
    (theirs / "config.json").write_text(json.dumps(cfg))
    r, _ = export.uniform_rank({k: v.shape for k, v in adapter.items()})  # as finalize writes it:
    adapter = {k: export.pad_lora(k, v, r) for k, v in adapter.items()}  # one rank, zero-padded
    save_file(adapter, str(theirs / "aser_adapter" / "adapter_model.safetensors"))
    (theirs / "aser_adapter" / "adapter_config.json").write_text(
        json.dumps(export.adapter_config(list(_ranks(tiny_model)), r), default=str))


def test_w4a16_pack_computed_with_marlins_int8_loads_with_that_quantizer(tiny_model, tmp_path: Path) -> None:
    """--format w4a16-pack (a_bits 8): pack-quantized files whose quantization_config states
    weights only (what vLLM's Marlin reads), and config.json's aser_activations saying the engine
    quantizes activations as Marlin does under VLLM_MARLIN_INPUT_DTYPE=int8: aser's loader
    computes exactly that, transformers reads the same files as W4A16."""
    from aser.checkpoint import export

    pieces = write_dest(tiny_model, tmp_path / "ours", 8, _ranks(tiny_model))
    dest = tmp_path / "marlin"
    _export_like_finalize(tiny_model, pieces, dest, "w4a8-marlin")
    cfg = json.loads((dest / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and cfg[export.ACTIVATIONS_KEY]["quantizer"] == "marlin"
    assert all(g.get("input_activations") is None for g in qc["config_groups"].values())
    model = load_aser_model(str(dest), backend="torch")
    lin = model.model.layers[1].mlp.down_proj
    assert isinstance(lin, AserLinear) and (lin.a_bits, lin.a_style) == (8, "marlin")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    for name, (x, y) in _linear_io(model, ids, sorted(pieces)).items():
        sim = FakeQuantLinear(pieces[name], 8, "marlin").simulate(x)
        assert rel_err(y, sim) <= tol("e2e_per_linear"), name
        # compressed-tensors' quantizer (absmax / 127.5, half to even) is measurably another one
        assert rel_err(FakeQuantLinear(pieces[name], 8).simulate(x), sim) > 10 * tol("e2e_per_linear"), name
    # transformers (compressed-tensors) reads the same files as W4A16: each base linear is the
    # W4A16 simulation without the adapter
    hf = AutoModelForCausalLM.from_pretrained(dest).eval()
    for name, (x, y_hf) in _linear_io(hf, ids, sorted(pieces)).items():
        base = FakeQuantLinear(replace(pieces[name], L_A=None, L_B=None), None).simulate(x)
        assert rel_err(y_hf, base) <= tol("e2e_per_linear"), name
    cfg[export.ACTIVATIONS_KEY] = {"quantizer": "fp8"}
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AserLoadError, match="aser_activations must state the marlin INT8 quantizer"):
        load_aser_model(str(dest), backend="torch")


@pytest.mark.parametrize("fmt,a_bits", [("w4a8", 8), ("w4a16", None)])
def test_loads_what_pipeline_export_writes(tiny_model, tmp_path: Path, fmt, a_bits):
    """Integration with aser/checkpoint/export.py: its per-layer tensors, config and adapter
    config, put in one file, load to the same model as the test writer's DEST."""
    ours = tmp_path / "ours"
    pieces = write_dest(tiny_model, ours, a_bits, _ranks(tiny_model))
    theirs = tmp_path / "theirs"
    _export_like_finalize(tiny_model, pieces, theirs, fmt)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a_logits = load_aser_model(str(ours), backend="torch")(ids).logits
        b_logits = load_aser_model(str(theirs), backend="torch")(ids).logits
    # The zero-padded rank changes the matmul shapes, hence fp32 summation order: equal up to it.
    torch.testing.assert_close(a_logits, b_logits, rtol=1e-5, atol=1e-6)


def test_a_base_that_needs_its_adapter_warns_when_loaded_without(tiny_model, tmp_path: Path) -> None:
    from aser.checkpoint import export
    from aser.kernels.loader import MissingAdapterWarning

    dest = tmp_path / "dest"
    write_dest(tiny_model, dest, 8, _ranks(tiny_model))
    cfg = json.loads((dest / "config.json").read_text())
    cfg[export.REQUIRES_ADAPTER_KEY] = {"adapter": export.ADAPTER_DIR}
    (dest / "config.json").write_text(json.dumps(cfg))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingAdapterWarning)
        load_aser_model(str(dest), backend="torch")  # with its adapter: no warning
    for f in (dest / "aser_adapter").iterdir():
        f.unlink()
    (dest / "aser_adapter").rmdir()
    with pytest.warns(MissingAdapterWarning, match="the base needs its adapter"):
        load_aser_model(str(dest), backend="torch")
