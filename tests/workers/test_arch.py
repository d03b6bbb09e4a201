"""The architecture table: which groups exist, which folds are exact, and what a fold writes."""

from __future__ import annotations

import pytest
import torch

from aser.workers.arch import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitecture,
    can_fold,
    check_supported,
    fold_smoothing,
    groups_for,
    linear_names,
)

GROUPS = {g.name: g for g in groups_for({"model_type": "llama"})}


def test_every_supported_type_has_the_four_llama_groups_in_order() -> None:
    for model_type in SUPPORTED_MODEL_TYPES:
        check_supported({"model_type": model_type})
        assert [g.name for g in groups_for({"model_type": model_type})] == ["qkv", "o", "gate_up", "down"]
    assert linear_names({"model_type": "qwen2"}) == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )


def test_unsupported_type_names_itself_and_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        check_supported({"model_type": "gpt2"})


class _Cfg:  # an HF config is read by attribute, a dict by key: both must work
    def __init__(self, heads: int, kv_heads: int | None) -> None:
        self.model_type = "llama"
        self.num_attention_heads = heads
        self.num_key_value_heads = kv_heads


@pytest.mark.parametrize("cfg,o_foldable", [
    ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4}, True),
    ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}, False),
    (_Cfg(4, None), True),  # no kv count: multi-head attention
    (_Cfg(8, 1), False),
])
def test_only_o_under_gqa_cannot_fold(cfg: object, o_foldable: bool) -> None:
    assert can_fold(GROUPS["o"], cfg) is o_foldable
    for name in ("qkv", "gate_up", "down"):  # norms, and up_proj rows (no head sharing) always fold
        assert can_fold(GROUPS[name], cfg)


@pytest.fixture(params=[1024, 2], ids=["whole", "row-blocks"])
def fold_block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The folds compute in float64 a block of rows at a time: the same bits as whole."""
    from aser.workers import arch

    monkeypatch.setattr(arch, "FOLD_ROW_BLOCK", request.param)
    return int(request.param)


def test_fold_into_linear_rows_scales_rows_and_bias_and_nothing_else(fold_block: int) -> None:
    K = 6
    g = torch.Generator().manual_seed(0)
    t = {
        "self_attn.o_proj.weight": torch.randn(4, K, generator=g, dtype=torch.float64),
        "self_attn.v_proj.weight": torch.randn(K, 5, generator=g, dtype=torch.float64),
        "self_attn.v_proj.bias": torch.randn(K, generator=g, dtype=torch.float64),
        "input_layernorm.weight": torch.rand(K, generator=g, dtype=torch.float64),
    }
    before = {k: v.clone() for k, v in t.items()}
    m = torch.linspace(0.5, 4.0, K, dtype=torch.float64)
    out = fold_smoothing(t, GROUPS["o"], m)
    assert torch.equal(out["self_attn.o_proj.weight"], t["self_attn.o_proj.weight"] * m[None, :])
    assert torch.equal(out["self_attn.v_proj.weight"], t["self_attn.v_proj.weight"] / m[:, None])
    assert torch.equal(out["self_attn.v_proj.bias"], t["self_attn.v_proj.bias"] / m)
    assert out["input_layernorm.weight"] is t["input_layernorm.weight"]  # other groups untouched
    assert all(torch.equal(before[k], t[k]) for k in t)  # the input dict and tensors are not modified
    # the product the fold must preserve: o(v(x)) is unchanged
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def ov(d: dict[str, torch.Tensor]) -> torch.Tensor:
        v = x @ d["self_attn.v_proj.weight"].T + d["self_attn.v_proj.bias"]
        return v @ d["self_attn.o_proj.weight"].T

    torch.testing.assert_close(ov(out), ov(t), rtol=1e-13, atol=0)
    half = fold_smoothing({k: v.to(torch.bfloat16) for k, v in t.items()}, GROUPS["o"], m)
    assert {v.dtype for v in half.values()} == {torch.bfloat16}  # each result cast back to its dtype
    no_bias = {k: v for k, v in t.items() if k != "self_attn.v_proj.bias"}
    assert "self_attn.v_proj.bias" not in fold_smoothing(no_bias, GROUPS["o"], m)


def test_fold_into_a_norm_divides_its_weight_and_scales_every_linear_of_the_group(fold_block: int) -> None:
    K = 5
    g = torch.Generator().manual_seed(1)
    t = {f"{lin}.weight": torch.randn(3, K, generator=g).to(torch.bfloat16) for lin in GROUPS["qkv"].linears}
    t["input_layernorm.weight"] = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16)
    m = torch.tensor([1.0, 2.0, 0.25, 3.0, 1.5], dtype=torch.float64)
    out = fold_smoothing(t, GROUPS["qkv"], m)
    for lin in GROUPS["qkv"].linears:
        W = t[f"{lin}.weight"]
        assert out[f"{lin}.weight"].dtype == torch.bfloat16  # cast back to each tensor's dtype
        assert torch.equal(out[f"{lin}.weight"], (W.double() * m).to(torch.bfloat16))
    assert out["input_layernorm.weight"].dtype == torch.bfloat16
    assert torch.equal(out["input_layernorm.weight"], (t["input_layernorm.weight"].double() / m).to(torch.bfloat16))
