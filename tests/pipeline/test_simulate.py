"""End to end on a real tiny Llama (stories260K): FP fidelity, then the methods' ordering."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aser.pipeline import cli, data, evaluate, simulate
from aser.workers.qlinear import SimQuantLinear
from aser.workers.reconstruct import MethodConfig


@pytest.fixture(scope="module")
def stories(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    return model, tok


def test_fp32_greedy_reproduces_llama2c(stories, stories_dir):
    model, tok = stories
    out = model.generate(torch.tensor([[tok.bos_token_id]]), do_sample=False, max_new_tokens=200)
    text = tok.decode(out[0, 1:], skip_special_tokens=True)
    assert text == (stories_dir / "expected_greedy_200.txt").read_text()


def test_fp_perplexity_matches_reference(stories, data_dir):
    model, tok = stories
    ids = data.tokenize(tok, (data_dir / "tinystories" / "sample.txt").read_text())
    assert evaluate.perplexity(model, data.eval_windows(ids, 256, 7)) == pytest.approx(3.818, abs=5e-4)


def test_methods_ordering_on_stories(stories, data_dir):
    model, tok = stories
    ids = data.tokenize(tok, (data_dir / "tinystories" / "sample.txt").read_text())
    calib = data.calibration_windows(ids, 32, 128, seed=0)
    windows = data.eval_windows(ids, 256, 7)
    fp_stats, _ = simulate.collect_fp_stats(model, calib, batch_size=8)
    ppl = {}
    for method in ("rtn", "er", "aser"):
        q = copy.deepcopy(model)
        simulate.apply_method(q, MethodConfig(method=method, rank=8), fp_stats=fp_stats)
        assert sum(isinstance(m, SimQuantLinear) for m in q.modules()) == 5 * 7
        ppl[method] = evaluate.perplexity(q, windows)
        if method == "aser":
            assert_extra_counts_shipped_adapter(q, rank=8)
    fp = evaluate.perplexity(model, windows)
    assert fp < ppl["aser"] < ppl["rtn"], ppl
    assert ppl["er"] < ppl["rtn"], ppl


def assert_extra_counts_shipped_adapter(model, rank: int) -> None:
    """ASER's f side columns ship as f one-hot rows of lora_A (K each) and f columns of lora_B
    (N each): (rank + f)·(N + K) 16-bit values per linear, against N·K quantized weights."""
    linears = [m for m in model.modules() if isinstance(m, SimQuantLinear)]
    assert any(m.num_side > 0 for m in linears)  # otherwise the side-column term goes untested
    values = sum((rank + m.num_side) * (m.out_features + m.in_features) for m in linears)
    weights = sum(m.out_features * m.in_features for m in linears)
    extra = simulate.extra_params(model)
    assert (extra.adapter_values, extra.adapter_bits, extra.quantized_weights) == (values, 16 * values, weights)
    assert extra.bits_per_weight == 16 * values / weights
    assert extra.percent == 100 * values / weights


def test_propagate_quantized_equals_fp_at_layer_zero_and_differs_after(stories, data_dir):
    model, tok = stories
    ids = data.tokenize(tok, (data_dir / "tinystories" / "sample.txt").read_text())
    calib = data.calibration_windows(ids, 8, 64, seed=1)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = simulate.apply_method(a, MethodConfig(method="er", rank=4), tokens=calib, propagate="fp")
    rb = simulate.apply_method(b, MethodConfig(method="er", rank=4), tokens=calib, propagate="quantized")
    la, lb = ra.layers, rb.layers
    # Layer 0 sees the same inputs under both propagations, so every computed metric is the
    # same float (same ops on the same data); only the wall-clock "*_s" entries may differ.
    def computed(rec: dict) -> dict:
        return {k: v for k, v in rec["linears"]["self_attn.q_proj"].items() if not k.endswith("_s")}

    assert computed(la[0]) == computed(lb[0])
    assert {"err_before", "err_after", "rank", "num_side_columns"} <= computed(la[0]).keys()
    assert la[0]["linears"]["mlp.down_proj"]["err_before"] == lb[0]["linears"]["mlp.down_proj"]["err_before"]
    assert la[-1]["linears"]["mlp.down_proj"]["err_before"] != lb[-1]["linears"]["mlp.down_proj"]["err_before"]


def test_cli_simulate_json(stories_dir, data_dir, capsys):
    sample = str(data_dir / "tinystories" / "sample.txt")
    rc = cli.main(["simulate", str(stories_dir), "--method", "aser", "--rank", "4", "--calib", sample,
                   "--num-samples", "4", "--seq-len", "64", "--eval", sample, "--max-windows", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("method", "rank", "w_bits", "a_bits", "num_samples", "seq_len", "ppl", "ppl_fp", "num_windows", "seconds",
                "adapter_values", "quantized_weights"):
        assert key in out
    # The reported cost is the adapter's: 16 bits per value over the quantized weights.
    assert out["extra_bits_per_weight"] == 16 * out["adapter_values"] / out["quantized_weights"] > 0
    assert out["extra_params_pct"] == 100 * out["adapter_values"] / out["quantized_weights"]
    assert out["num_windows"] == 3 and out["method"] == "aser" and out["ppl"] > out["ppl_fp"] > 1


def test_cli_bad_values_fail_before_work(stories_dir, data_dir, capsys):
    sample = str(data_dir / "tinystories" / "sample.txt")
    assert cli.main(["simulate", str(stories_dir), "--rank", "-2", "--eval", sample]) == 2
    assert "method.rank" in capsys.readouterr().err
    assert cli.main(["simulate", str(stories_dir), "--calib", sample, "--seq-len", "4096", "--eval", sample,
                     "--max-windows", "1", "--seq-len", "4096"]) == 2


def test_the_simulated_model_quantizes_activations_as_the_format_serves_them(stories, data_dir):
    """--format w4a16-pack (Marlin's INT8 activations) and w4a8-int (compressed-tensors') give
    differently quantized models from the same reconstruction."""
    model, tok = stories
    calib = data.calibration_windows(data.tokenize(tok, (data_dir / "tinystories" / "sample.txt").read_text()), 4, 32, seed=1)
    logits = {}
    for style in ("compressed-tensors", "marlin"):
        m = copy.deepcopy(model)
        simulate.apply_method(m, MethodConfig(method="aser", rank=4, act_quant=style), tokens=calib, propagate="fp")
        sims = [mod for mod in m.modules() if isinstance(mod, simulate.SimQuantLinear)]
        assert sims and {s.a_style for s in sims} == {style}
        with torch.no_grad():
            logits[style] = m(calib[:1]).logits
    assert not torch.equal(logits["compressed-tensors"], logits["marlin"])
