"""ASER and baselines: exact folds, rank-0 identity, GPTQ <= RTN, the (alpha, f) search finds its minimum."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from aser.kernels.quant import dequantize_weight, quantize_weight
from aser.pipeline import simulate
from aser.workers.arch import UnsupportedArchitecture, groups_for, linear_names
from aser.workers.gptq import gptq_quantize
from aser.workers.lowrank import l2qer_lowrank, output_error_sq, plain_lowrank, whitened_lowrank
from aser.workers.reconstruct import (
    METHODS,
    MethodConfig,
    quantize_layer,
    reconstruct_linear,
    smooth_layer,
    smoothing_scale,
)
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


@pytest.mark.parametrize("method", ["aser", "gptq+aser"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_what_the_base_holds_in_the_outlier_columns(method, group_size):
    W, st = _linear_problem(8)
    O = torch.tensor([3, 20])
    W[:, 3] *= 30  # a smoothed outlier column: far beyond the other columns' range
    keep = ~torch.isin(torch.arange(64), O)
    res = {b: reconstruct_linear(W, st, O, MethodConfig(method=method, rank=4, base_outliers=b, group_size=group_size))
           for b in ("zero", "clipped", "full")}
    assert (res["zero"].q[:, O] == 0).all()
    # clipped: the kept columns and their scale are the zero layout's; the outliers rounded at that scale
    assert torch.equal(res["clipped"].q[:, keep], res["zero"].q[:, keep])
    assert torch.equal(res["clipped"].scale, res["zero"].scale)
    torch.testing.assert_close(res["clipped"].q[:, O], quantize_weight(W, 4, group_size, scale=res["zero"].scale)[0][:, O],
                               rtol=0, atol=0)
    assert (res["clipped"].q[:, 3].abs() >= 7).float().mean() > 0.5  # mostly clipped
    # full: the scale covers every column, so no outlier code is clipped
    torch.testing.assert_close(res["full"].scale, quantize_weight(W, 4, group_size)[1], rtol=0, atol=0)
    assert (res["full"].scale[:, 0] > res["zero"].scale[:, 0]).double().mean() > 0.5  # column 3's group
    for r in res.values():
        # base + adapter holds the outlier columns exactly whatever the base holds there
        Wh = dequantize_weight(r.q, r.scale, group_size) + r.L_A @ r.L_B
        torch.testing.assert_close(Wh[:, O], W[:, O], rtol=1e-12, atol=1e-12)
        assert r.rank == 4 + 2
    # the base alone: the outlier columns' part of the output error is smaller the more the base holds
    base_err = {b: output_error_sq(W - dequantize_weight(r.q, r.scale, group_size), st.gram) for b, r in res.items()}
    assert base_err["full"] < base_err["zero"] / 10 and base_err["clipped"] < base_err["zero"]


def test_lowrank_mode_puts_extracted_columns_into_the_error():
    W, st = _linear_problem(3)
    O = torch.tensor([3])
    res = reconstruct_linear(W, st, O, MethodConfig(method="aser", rank=4, outlier_mode="lowrank"))
    assert (res.q[:, 3] == 0).all() and res.rank == 4
    E = W - dequantize_weight(res.q, res.scale)
    torch.testing.assert_close(E[:, 3], W[:, 3])


def _outlier_layer():
    """Layer 0 of the tiny MHA model with two outlier input channels of qkv (norm weight x300)
    and one of gate_up: extracting exactly those as side columns is what the search should find."""
    model = _tiny("mha")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[[2, 11]] *= 300
        model.model.layers[0].post_attention_layernorm.weight[[5]] *= 300
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    layer, _, _, stats = _layer_stats(model, tokens)
    return model.config, simulate.layer_tensors(layer), stats


def _objective(tensors, stats, g, cfg, alpha, f) -> float:
    """What the search claims to minimise for group g at grid point (alpha, f), from its definition:
    Σ_i ‖(W_i·diag(m) − Ŵ_i − L_A L_B) X̃‖² with m, O = smoothing_scale(...) and X̃ = X / m."""
    smoothquant = cfg.smoothing == "smoothquant"
    weights = [tensors[f"{lin}.weight"] for lin in g.linears]
    m, O = smoothing_scale(weights, stats[g.name], alpha, f, "all" if smoothquant else cfg.smooth_channels)
    O = None if smoothquant or cfg.outlier_mode == "none" else O
    st = stats[g.name].scaled(m)
    total = 0.0
    for W in weights:
        Wm = W.double() * m
        total += output_error_sq(Wm - _recon(reconstruct_linear(Wm, st, O, cfg)), st.gram)
    return total


def test_search_picks_the_grid_point_with_the_least_error():
    config, tensors, stats = _outlier_layer()
    base = dict(method="aser", rank=8, outlier_mode="side", reserve_rank=True, svd="exact")
    alphas, fs = (0.25, 0.75), (0, 1, 2, 4)
    sm = smooth_layer(tensors, stats, MethodConfig(alpha_grid=alphas, outlier_grid=fs, **base), config)
    norm_groups = [g for g in groups_for(config) if g.producer_kind == "norm"]
    for g, best_f in zip(norm_groups, (2, 1)):  # qkv has two outlier channels, gate_up one
        cfg = MethodConfig(**base)
        errs = {(a, f): _objective(tensors, stats, g, cfg, a, f) for a in alphas for f in fs}
        chosen = sm.choices[g.name]
        assert chosen["num_outliers"] == best_f
        # The search's figure is the objective of the point it chose, and that is the minimum.
        assert chosen["search_error"] == pytest.approx(errs[chosen["alpha"], best_f], rel=1e-9)
        assert chosen["search_error"] == pytest.approx(min(errs.values()), rel=1e-9)
        # The data make the answer non-trivial: neither ER (f = 0), nor the first or the last grid
        # point, nor the most outliers comes within 10 % of it (measured: >= 22 % and >= 3.5x).
        for other in ((alphas[0], 0), (alphas[-1], fs[-1]), (alphas[0], fs[-1])):
            assert errs[other] > 1.1 * chosen["search_error"]
    # The chosen smoothing is the one applied: the layer's tensors carry that fold.
    assert torch.equal(sm.outliers["qkv"], torch.tensor([2, 11]))
    assert torch.equal(sm.outliers["gate_up"], torch.tensor([5]))


def _recon(res):
    W = dequantize_weight(res.q, res.scale.double())  # in fp64, as reconstruct_linear measures
    return W if res.L_A is None else W + res.L_A.double() @ res.L_B.double()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="method.rank"):
        MethodConfig(rank=-1).validate()
    with pytest.raises(ValueError, match="method.method"):
        MethodConfig(method="awq").validate()
    with pytest.raises(ValueError, match="^unknown method field\\(s\\): alhpa, rnak$"):
        MethodConfig.from_dict({"rnak": 3, "alhpa": 0.5})
    cfg = MethodConfig(alpha_grid=(0.25, 0.5))
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        groups_for({"model_type": "gpt2"})


@pytest.mark.parametrize("field,bad,good,why", [
    ("rank", -1, 0, "must be >= 0"), ("w_bits", 1, 2, "must be in [2, 8]"), ("w_bits", 9, 8, "must be in [2, 8]"),
    ("a_bits", 1, 2, "must be in [2, 8] or None"), ("a_bits", 9, None, "must be in [2, 8] or None"),
    ("group_size", 0, 1, "must be > 0 or None"), ("alpha", -0.01, 0.0, "must be in [0, 1]"),
    ("alpha", 1.01, 1.0, "must be in [0, 1]"), ("alpha_grid", (0.5, 1.5), (0.0, 1.0), "values must be in [0, 1]"),
    ("alpha_grid", (-0.5,), (0.5,), "values must be in [0, 1]"), ("num_outliers", -1, 0, "must be >= 0"),
    ("outlier_grid", (2, -1), (0, 2), "values must be >= 0"),
    ("outlier_mode", "dense", "lowrank", "must be one of ('lowrank', 'side', 'none')"),
    ("smooth_channels", "some", "all", "must be one of ('outliers', 'all')"), ("damp", 0.0, 1e-9, "must be > 0"),
    ("svd", "qr", "randomized", "must be one of ('exact', 'randomized', 'auto')"),
    ("rank_energy", 0.0, 1.0, "must be in (0, 1]"), ("rank_energy", 1.01, 0.5, "must be in (0, 1]"),
    ("method", "awq", "gptq", "must be one of " + ", ".join(METHODS)),
])
def test_config_bounds(field, bad, good, why):
    MethodConfig(**{field: good}).validate()
    # the message names the field the user wrote and the value that is wrong
    with pytest.raises(ValueError) as e:
        MethodConfig(**{field: bad}).validate()
    assert str(e.value) == f"method.{field} {why}, got {bad!r}"


def test_what_each_method_is_made_of():
    table = {  # method: (quantizer, low-rank kind, smoothing)
        "rtn": ("rtn", None, None), "smoothquant": ("rtn", None, "smoothquant"), "lorc": ("rtn", "plain", None),
        "l2qer": ("rtn", "l2qer", None), "er": ("rtn", "whitened", None), "aser": ("rtn", "whitened", "aser"),
        "gptq": ("gptq", None, None), "gptq+er": ("gptq", "whitened", None), "gptq+aser": ("gptq", "whitened", "aser"),
    }
    assert set(table) == set(METHODS)
    for method, parts in table.items():
        cfg = MethodConfig(method=method)
        assert (cfg.quantizer, cfg.lowrank, cfg.smoothing) == parts


def test_smoothing_scale_follows_its_formula():
    W1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.5, 1.0, -4.0, 0.0]], dtype=torch.float64)
    W2 = torch.tensor([[3.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    st = StatsAccumulator(4)
    st.add(torch.tensor([[8.0, -1.0, 0.75, 0.0]], dtype=torch.float64))
    stats = st.result()
    a = torch.tensor([8.0, 1.0, 0.75, 1e-5], dtype=torch.float64)
    w = torch.tensor([3.0, 2.0, 4.0, 1e-5], dtype=torch.float64)  # max |W_ij| over the group
    m_all = a**0.25 / w**0.75
    m, O = smoothing_scale([W1, W2], stats, 0.25, 2, "outliers")
    assert O.tolist() == [0, 2]  # scores a·w = 24, 2, 3, 1e-10 (a and w clamped at 1e-5)
    torch.testing.assert_close(m, torch.tensor([m_all[0], 1.0, m_all[2], 1.0], dtype=torch.float64), rtol=1e-15, atol=0)
    m, O = smoothing_scale([W1, W2], stats, 0.25, 9, "all")
    torch.testing.assert_close(m, m_all, rtol=1e-15, atol=0)
    assert O.tolist() == [0, 1, 2, 3]  # f capped at the width
    m, O = smoothing_scale([W1, W2], stats, 0.25, 0, "outliers")
    assert O is None and torch.equal(m, torch.ones(4, dtype=torch.float64))


def test_smoothquant_never_extracts_channels_and_smooths_all_of_them():
    W, st = _linear_problem(4)
    tensors = {f"{lin}.weight": W[:, :32].clone() for g in groups_for({"model_type": "llama"}) for lin in g.linears}
    tensors.update({"input_layernorm.weight": torch.ones(32, dtype=torch.float64),
                    "post_attention_layernorm.weight": torch.ones(32, dtype=torch.float64),
                    "self_attn.v_proj.weight": W[:32, :32].clone(), "mlp.up_proj.weight": W[:32, :32].clone()})
    sub = StatsAccumulator(32)
    sub.add(torch.randn(64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * torch.logspace(0, 1, 32))
    stats = {g: sub.result() for g in ("qkv", "o", "gate_up", "down")}
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4}
    cfg = MethodConfig(method="smoothquant", alpha_grid=(0.2, 0.8), outlier_grid=(4, 8))
    sm = smooth_layer(tensors, stats, cfg, config)
    # the search scores the smoothed weights W·diag(m) (here m is on every channel)
    qkv = groups_for(config)[0]
    errs = [_objective(tensors, stats, qkv, cfg, a, 0) for a in (0.2, 0.8)]
    assert sm.choices["qkv"]["search_error"] == pytest.approx(min(errs), rel=1e-9)
    assert sm.choices["qkv"]["alpha"] == (0.2, 0.8)[errs.index(min(errs))] and errs[0] != errs[1]
    for g in ("qkv", "o", "gate_up", "down"):
        assert sm.outliers[g] is None and sm.choices[g]["num_outliers"] == 0.0 and sm.choices[g]["smoothed"] == 1.0
    m = tensors["input_layernorm.weight"] / sm.tensors["input_layernorm.weight"]
    assert (m != 1.0).all()  # every channel smoothed, not only outliers
    sm_rtn = smooth_layer(tensors, stats, MethodConfig(method="rtn"), {"model_type": "llama"})
    assert sm_rtn.tensors == tensors and sm_rtn.outliers == dict.fromkeys(("qkv", "o", "gate_up", "down")) and sm_rtn.choices == {}
    # no grid, no search: the one candidate is taken and reported with search_error 0
    one = smooth_layer(tensors, stats, MethodConfig(method="aser", num_outliers=2, outlier_mode="none"), config)
    assert all(o is None for o in one.outliers.values())  # outlier_mode none extracts nothing
    assert {c["search_error"] for c in one.choices.values()} == {0.0}


def test_metrics_are_what_they_say():
    W, st = _linear_problem(5)
    res = reconstruct_linear(W, st, torch.tensor([3]), MethodConfig(method="aser", rank=4, damp=0.05, svd="exact"))
    G = st.gram
    E = W - dequantize_weight(res.q, res.scale)
    ref = output_error_sq(W, G)
    assert res.metrics["err_before"] == pytest.approx((output_error_sq(E, G) / ref) ** 0.5, rel=1e-12)
    R = W - _recon(res)
    assert res.metrics["err_after_sq"] == pytest.approx(output_error_sq(R, G), rel=1e-9)
    assert res.metrics["err_after"] == pytest.approx((output_error_sq(R, G) / ref) ** 0.5, rel=1e-9)
    assert res.metrics["err_after"] < 0.75 * res.metrics["err_before"]  # measured 0.54
    assert (res.metrics["rank"], res.metrics["num_side_columns"], res.metrics["damp"]) == (5.0, 1.0, 0.05)
    assert res.metrics["cholesky_tries"] == 1.0 and res.rank == 5
    for k in ("quantize_s", "cholesky_s", "svd_s", "lowrank_s"):
        assert 0.0 < res.metrics[k] < 30.0  # durations (> the clock's ns resolution), not timestamps
    assert res.metrics["lowrank_s"] >= res.metrics["svd_s"]
    zero = reconstruct_linear(torch.zeros_like(W), st, None, MethodConfig(method="rtn", rank=0))
    assert zero.metrics["err_before"] == 0.0 and zero.metrics["err_after"] == 0.0
    plain = reconstruct_linear(W, st, None, MethodConfig(method="lorc", rank=2)).metrics
    assert plain["damp"] == 0.0 and plain["cholesky_tries"] == 0.0 and plain["cholesky_s"] == 0.0


def test_outputs_are_in_the_stored_dtype_and_errors_measure_what_is_stored():
    W, st = _linear_problem(6)
    res = reconstruct_linear(W, st, torch.tensor([3, 7]), MethodConfig(method="aser", rank=3), scale_dtype=torch.bfloat16)
    assert res.scale.dtype == res.L_A.dtype == res.L_B.dtype == torch.bfloat16
    assert res.metrics["err_after_sq"] == pytest.approx(output_error_sq(W - _recon(res), st.gram), rel=1e-9)


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_with_outliers_quantizes_only_the_kept_columns(group_size):
    W, st = _linear_problem(7)
    O = torch.tensor([3, 20])
    keep = ~torch.isin(torch.arange(64), O)
    cfg = MethodConfig(method="gptq+aser", rank=0, outlier_mode="side", group_size=group_size)

    def expected(scale_dtype):
        if group_size is None:  # GPTQ on the kept columns alone, with their Gram block
            q, scale = gptq_quantize(W[:, keep], st.gram[keep][:, keep], 4, damp=cfg.gptq_damp, scale_dtype=scale_dtype)
            full = torch.zeros(W.shape, dtype=torch.int8)
            full[:, keep] = q
            return full, scale
        # groups keep their columns: the extracted ones are zeroed, not removed
        return gptq_quantize(torch.where(keep, W, 0.0), st.gram, 4, group_size=16, damp=cfg.gptq_damp,
                             scale_dtype=scale_dtype)

    for scale_dtype in (torch.float64, torch.bfloat16):  # scales rounded to the stored dtype first
        res = reconstruct_linear(W, st, O, cfg, scale_dtype=scale_dtype)
        q, scale = expected(scale_dtype)
        assert torch.equal(res.q, q) and torch.equal(res.scale, scale.to(scale_dtype))
        assert (res.q[:, O] == 0).all() and res.rank == 2
    res = reconstruct_linear(W, st, O, cfg)
    rtn = reconstruct_linear(W, st, O, MethodConfig(method="aser", rank=0, group_size=group_size))
    assert res.metrics["err_after"] < rtn.metrics["err_after"]


def test_quantize_layer_reconstructs_every_linear_of_the_smoothed_layer():
    model = _tiny("gqa")
    layer, _, _, stats = _layer_stats(model, torch.randint(0, 64, (4, 8)))
    cfg = MethodConfig(method="aser", rank=2, num_outliers=2)
    seen, returned = [], []

    def spy(W, st, O, c, *, scale_dtype):
        seen.append((W, st, O))
        returned.append(reconstruct_linear(W, st, O, c, scale_dtype=scale_dtype))
        return returned[-1]

    sm, results = quantize_layer(simulate.layer_tensors(layer), stats, cfg, model.config, reconstruct=spy)
    assert list(results) == list(linear_names(model.config))
    assert all(r is s for r, s in zip(results.values(), returned))
    for (W, st, O), lin in zip(seen, results):
        g = next(g for g in groups_for(model.config) if lin in g.linears)
        assert W is sm.tensors[f"{lin}.weight"] and st is sm.stats[g.name] and O is sm.outliers[g.name]


@pytest.mark.parametrize("method,fn", [("lorc", "plain"), ("l2qer", "l2qer"), ("er", "whitened")])
def test_each_method_runs_its_own_lowrank(method, fn):
    W, st = _linear_problem(8)
    res = reconstruct_linear(W, st, None, MethodConfig(method=method, rank=3, svd="exact", damp=0.03))
    E = W - dequantize_weight(res.q, res.scale)
    lr = {"plain": lambda: plain_lowrank(E, 3), "l2qer": lambda: l2qer_lowrank(E, st.mean_abs, 3),
          "whitened": lambda: whitened_lowrank(E, st.gram, 3, damp=0.03)}[fn]()
    torch.testing.assert_close(res.L_A @ res.L_B, lr.L_A @ lr.L_B, rtol=1e-12, atol=1e-14)


def test_rtn_groups_and_errors_are_scale_free():
    W, st = _linear_problem(9)
    res = reconstruct_linear(W, st, None, MethodConfig(method="rtn", rank=0, group_size=16))
    assert torch.equal(res.q, quantize_weight(W, 4, 16)[0]) and res.scale.shape == (40, 4)
    # A power-of-two scale of W changes no code: relative errors are identical, also when
    # ‖W X‖² < 1 (the guard against a zero reference is > 0, nothing else).
    tiny = reconstruct_linear(W * 2.0**-20, st, None, MethodConfig(method="er", rank=2, svd="exact"))
    ref = reconstruct_linear(W, st, None, MethodConfig(method="er", rank=2, svd="exact"))
    assert output_error_sq(W * 2.0**-20, st.gram) < 1.0
    for k in ("err_before", "err_after"):
        assert tiny.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-9) and tiny.metrics[k] > 0


def test_svd_settings_reach_the_lowrank_step():
    W, st = _linear_problem(10, N=96, K=128)

    def lA(method, **kw):
        return reconstruct_linear(W, st, None, MethodConfig(method=method, rank=2, svd="randomized", **kw)).L_A

    for method in ("er", "lorc", "l2qer"):
        base = lA(method, svd_niter=1, svd_oversample=4)
        assert not torch.equal(base, lA(method, svd_niter=6, svd_oversample=4))
        assert not torch.equal(base, lA(method, svd_niter=1, svd_oversample=20))


def test_rank_settings_reach_the_lowrank_step():
    W, st = _linear_problem(11)
    for method in ("rtn", "gptq", "smoothquant"):  # no low-rank part, whatever the rank
        assert reconstruct_linear(W, st, None, MethodConfig(method=method, rank=8)).L_A is None
    assert reconstruct_linear(W, st, None, MethodConfig(method="er", rank=1)).rank == 1
    energy = reconstruct_linear(W, st, None, MethodConfig(method="er", rank=16, rank_energy=1e-9, svd="exact"))
    assert energy.rank == 1


def test_gptq_damping_reaches_the_quantizer():
    W, st = _linear_problem(12)
    for O in (None, torch.tensor([3])):
        a = reconstruct_linear(W, st, O, MethodConfig(method="gptq+aser", rank=0, gptq_damp=1e-3))
        b = reconstruct_linear(W, st, O, MethodConfig(method="gptq+aser", rank=0, gptq_damp=10.0))
        assert not torch.equal(a.q, b.q)


@pytest.mark.parametrize("outlier_mode", ["side", "lowrank"])
def test_errors_through_the_whitening_factor_equal_the_direct_products(outlier_mode):
    """The whitened methods measure ‖D X‖² as ‖D S‖² − shift‖D‖² from E S (the SVD's input),
    one N K² product instead of three. On a Gram whose channel scales span 10^4 (eigenvalues
    ~10^8 apart) with an outlier channel, and with side columns, it equals tr(D G Dᵀ) computed
    directly to 1e-9 relative (measured: 0 and 2.2e-16)."""
    g = torch.Generator().manual_seed(3)
    K, N = 96, 48
    X = torch.randn(700, K, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, K, dtype=torch.float64)
    X[:, 5] *= 30
    acc = StatsAccumulator(K)
    acc.add(X)
    st = acc.result()
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    O = torch.tensor([5, 40])
    cfg = MethodConfig(method="aser", rank=8, num_outliers=2, outlier_mode=outlier_mode, svd="exact")
    res = reconstruct_linear(W, st, O, cfg)
    ref = output_error_sq(W, st.gram)
    E = W - dequantize_weight(res.q, res.scale.double())
    R = W - _recon(res)
    assert res.metrics["err_before"] == pytest.approx((output_error_sq(E, st.gram) / ref) ** 0.5, rel=1e-9)
    assert res.metrics["err_after_sq"] == pytest.approx(output_error_sq(R, st.gram), rel=1e-9)
    assert res.metrics["err_after"] < res.metrics["err_before"]


def test_reconstruction_threads_are_the_tasks_cpus_and_repeat_their_bytes(monkeypatch):
    """Issue 9: a reconstruction task runs ``workers.reconstruct_cpus`` torch threads. The count
    is part of the run's recorded config, so a resumed run uses it again; with the same count,
    every byte of the result repeats (checked here twice at 2 threads)."""
    from aser.workers import layer_tasks

    seen = []
    real = layer_tasks.reconstruct_linear

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        return real(*args, **kw)

    monkeypatch.setattr(layer_tasks, "reconstruct_linear", spy)
    W, st = _linear_problem(3, N=192, K=384, T=2048)
    payload = layer_tasks.GroupPayload(st.channels, None, None)
    cfg = MethodConfig(method="gptq+er", rank=16)
    before = torch.get_num_threads()
    try:
        runs = [layer_tasks.reconstruct_task(W.float(), payload, cfg, lambda: [st.gram], threads=t) for t in (2, 2, 1)]
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 1]
    a, b, one = runs
    for name in ("q", "scale", "L_A", "L_B"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.q, one.q) or (a.q != one.q).float().mean() < 0.01
