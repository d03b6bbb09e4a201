"""ASER and baselines: exact folds, rank-0 identity, GPTQ <= RTN, searches never lose to ER."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from aser.kernels.quant import dequantize_weight, quantize_weight
from aser.pipeline import simulate
from aser.workers.arch import UnsupportedArchitecture, groups_for
from aser.workers.lowrank import output_error_sq
from aser.workers.reconstruct import MethodConfig, reconstruct_linear, smooth_layer
from aser.workers.stats import StatsAccumulator


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4 if kind == "mha" else 2, **common))
    model = model.to(torch.float64).eval()
    with torch.no_grad():  # give the norms non-trivial weights so folds are really exercised
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _layer_stats(model, tokens):
    inputs = simulate.capture_layer_inputs(model, tokens, batch_size=4)
    layer = simulate.decoder_layers(model)[0]
    out, stats = simulate.run_layer(layer, inputs, model.config, with_stats=True)
    return layer, inputs, out, stats


@pytest.mark.parametrize("kind", ["mha", "gqa", "qwen2"])
@pytest.mark.parametrize("method,extra", [("smoothquant", {}), ("aser", {"num_outliers": 5, "alpha": 0.7}),
                                          ("aser", {"smooth_channels": "all", "outlier_mode": "none"})])
def test_folds_leave_fp_output_unchanged(kind, method, extra):
    model = _tiny(kind)
    tokens = torch.randint(0, 64, (8, 16))
    layer, inputs, out, stats = _layer_stats(model, tokens)
    cfg = MethodConfig(method=method, **extra)
    sm = smooth_layer(simulate.layer_tensors(layer), stats, cfg, model.config)
    assert any(ch["smoothed"] for ch in sm.choices.values())
    folded = copy.deepcopy(layer)
    folded.load_state_dict(sm.tensors)
    changed = [k for k in sm.tensors if not torch.equal(sm.tensors[k], layer.state_dict()[k])]
    assert changed, "smoothing changed nothing"
    if kind != "mha":  # GQA: o_proj cannot be smoothed, so v_proj rows are untouched by it
        assert not sm.choices["o"]["smoothed"]
    new_out, _ = simulate.run_layer(folded, inputs, model.config, with_stats=False)
    for a, b in zip(out.hidden, new_out.hidden):
        assert float((a - b).norm() / a.norm()) <= 1e-6


def _linear_problem(seed=0, N=40, K=64, T=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, K, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, K)
    X[:, 3] *= 20  # an outlier channel
    acc = StatsAccumulator(K)
    acc.add(X)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    return W, acc.result()


def test_rank_zero_equals_plain_quantization_exactly():
    W, st = _linear_problem()
    rtn = reconstruct_linear(W, st, None, MethodConfig(method="rtn", rank=0))
    for m in ("er", "lorc", "l2qer"):
        r0 = reconstruct_linear(W, st, None, MethodConfig(method=m, rank=0))
        assert r0.L_A is None and r0.L_B is None
        assert torch.equal(r0.q, rtn.q) and torch.equal(r0.scale, rtn.scale)
    q, scale = quantize_weight(W, 4)
    assert torch.equal(rtn.q, q) and torch.equal(rtn.scale, scale)


def test_error_non_increasing_in_rank():
    W, st = _linear_problem(1)
    errs = [reconstruct_linear(W, st, None, MethodConfig(method="er", rank=r, svd="exact", damp=1e-10)).metrics["err_after"]
            for r in (0, 2, 4, 8, 16, 40)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-6 * errs[0]


def test_gptq_weighted_error_le_rtn():
    for seed in range(3):
        W, st = _linear_problem(seed)
        g = reconstruct_linear(W, st, None, MethodConfig(method="gptq", rank=0))
        r = reconstruct_linear(W, st, None, MethodConfig(method="rtn", rank=0))
        assert g.metrics["err_before"] < r.metrics["err_before"]
        # GPTQ's codes obey the same scale convention (row absmax / 7.5 fixed before the sweep)
        assert torch.equal(g.scale, quantize_weight(W, 4)[1])


def test_side_columns_are_exact_and_cost_rank():
    W, st = _linear_problem(2)
    O = torch.tensor([3, 10])
    res = reconstruct_linear(W, st, O, MethodConfig(method="aser", rank=0, outlier_mode="side"))
    assert res.rank == 2 and (res.q[:, O] == 0).all()
    Wh = dequantize_weight(res.q, res.scale) + res.L_A @ res.L_B
    torch.testing.assert_close(Wh[:, O], W[:, O], rtol=0, atol=0)
    reserved = reconstruct_linear(W, st, O, MethodConfig(method="aser", rank=8, outlier_mode="side", reserve_rank=True))
    assert reserved.rank == 8


def test_lowrank_mode_puts_extracted_columns_into_the_error():
    W, st = _linear_problem(3)
    O = torch.tensor([3])
    res = reconstruct_linear(W, st, O, MethodConfig(method="aser", rank=4, outlier_mode="lowrank"))
    assert (res.q[:, 3] == 0).all() and res.rank == 4
    E = W - dequantize_weight(res.q, res.scale)
    torch.testing.assert_close(E[:, 3], W[:, 3])


def test_search_never_loses_to_er_on_its_own_objective():
    model = _tiny("mha")
    tokens = torch.randint(0, 64, (8, 16))
    layer, _, _, stats = _layer_stats(model, tokens)
    tensors = simulate.layer_tensors(layer)
    cfg = MethodConfig(method="aser", rank=4, outlier_mode="side", reserve_rank=True,
                       alpha_grid=(0.25, 0.5), outlier_grid=(0, 2))
    sm = smooth_layer(tensors, stats, cfg, model.config)
    er = MethodConfig(method="er", rank=4)
    for g in groups_for(model.config):
        er_err = sum(output_error_sq(
            tensors[f"{lin}.weight"].double() - _recon(reconstruct_linear(tensors[f"{lin}.weight"], stats[g.name], None, er)),
            stats[g.name].gram) for lin in g.linears)
        assert sm.choices[g.name]["search_error"] <= er_err * (1 + 1e-9)


def _recon(res):
    W = dequantize_weight(res.q, res.scale).double()
    return W if res.L_A is None else W + res.L_A.double() @ res.L_B.double()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="method.rank"):
        MethodConfig(rank=-1).validate()
    with pytest.raises(ValueError, match="method.method"):
        MethodConfig(method="awq").validate()
    with pytest.raises(ValueError, match="unknown method field"):
        MethodConfig.from_dict({"rnak": 3})
    cfg = MethodConfig(alpha_grid=(0.25, 0.5))
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        groups_for({"model_type": "gpt2"})
