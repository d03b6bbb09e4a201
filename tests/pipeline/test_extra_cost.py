"""The adapter's extra cost, counted on the checkpoint export writes (side columns included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aser.kernels.quant import quantize_weight
from aser.checkpoint import export
from aser.pipeline import manifest
from aser.workers.reconstruct import LinearResult


def _write_one_layer_checkpoint(tmp_path: Path, fmt: str, results: dict[str, LinearResult],
                                fp: dict[str, torch.Tensor]) -> str:
    """Embeddings, one decoder layer holding `results`, the head; finalized as the driver does."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    dest = str(tmp_path / "dest")
    export.write_stage(dest, 0, 1, {"model.embed_tokens.weight": torch.zeros(8, 4)})
    base, adapter = export.layer_tensors("model.layers.0.", fp, results, fmt, None)  # type: ignore[arg-type]
    parts = [f for f in export.write_stage(dest, 1, 1, base, adapter) if f.startswith(export.ADAPTER_PARTS_DIR)]
    export.write_stage(dest, 2, 1, {"model.norm.weight": torch.ones(4)})
    export.finalize(dest, str(src), 1, fmt, None, parts)  # type: ignore[arg-type]
    return dest


@pytest.mark.parametrize("fmt, dtype, bits", [("w4a8", torch.bfloat16, 16), ("w4a16", torch.float32, 32)])
def test_shipped_cost_counts_side_columns_as_full_adapter_rows(tmp_path: Path, fmt: str, dtype: torch.dtype,
                                                               bits: int) -> None:
    N, K, r, f = 24, 40, 3, 2
    g = torch.Generator().manual_seed(0)
    W, W2 = torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    cols = torch.tensor([5, 17])
    # ASER's side columns as reconstruct ships them: exact columns of W in L_A, one-hot rows in L_B.
    sel = torch.zeros(f, K)
    sel[torch.arange(f), cols] = 1.0
    L_A = torch.cat([torch.randn(N, r, generator=g), W[:, cols]], dim=1).to(dtype)
    L_B = torch.cat([torch.randn(r, K, generator=g), sel], dim=0).to(dtype)
    results = {"mlp.down_proj": LinearResult(*quantize_weight(W, 4), L_A, L_B),
               "mlp.up_proj": LinearResult(*quantize_weight(W2, 4), None, None)}  # rank 0: no adapter
    dest = _write_one_layer_checkpoint(tmp_path, fmt, results, {"mlp.down_proj.weight": W, "mlp.up_proj.weight": W2})

    cost = manifest.shipped_extra_cost(dest)
    values = (r + f) * (N + K)  # f side columns cost f·(N + K), not f·N
    assert (cost.adapter_values, cost.adapter_bits, cost.quantized_weights) == (values, bits * values, 2 * N * K)
    assert cost.bits_per_weight == bits * values / (2 * N * K)
    assert cost.to_dict()["extra_params_pct"] == 100 * values / (2 * N * K)


def test_no_adapter_costs_nothing(tmp_path: Path) -> None:
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    dest = _write_one_layer_checkpoint(tmp_path, "w4a8", {"mlp.down_proj": LinearResult(*quantize_weight(W, 4), None, None)},
                                       {"mlp.down_proj.weight": W})
    cost = manifest.shipped_extra_cost(dest)
    assert (cost.adapter_values, cost.quantized_weights, cost.bits_per_weight) == (0, 8 * 16, 0.0)
