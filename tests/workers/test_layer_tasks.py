"""The pipeline's split of a layer's work (statistics parts -> smoothing -> one task per linear)
gives the same bits as the sequential reference, and the Grams travel only where they are used."""

import pytest
import torch

from aser.pipeline import simulate
from aser.workers import layer_tasks
from aser.workers.arch import groups_for
from aser.workers.lowrank import damped_cholesky
from aser.workers.reconstruct import MethodConfig, quantize_layer, reconstruct_linear
from aser.workers.stats import GroupStats, reduce_parts, split_parts
from test_reconstruct import _tiny


def _parts(model, workers: int = 3):
    """Layer 0's statistics as ``workers`` calibration workers make them (a shard each)."""
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    layer = simulate.decoder_layers(model)[0]
    parts = []
    for shard in torch.chunk(tokens, workers):
        inputs = simulate.capture_layer_inputs(model, shard, batch_size=4)
        _, stats = simulate.run_layer(layer, inputs, model.config, with_stats=True)
        parts.append(stats)
    return simulate.layer_tensors(layer), parts


@pytest.mark.parametrize("cfg", [
    MethodConfig(method="aser", rank=4, num_outliers=2),
    MethodConfig(method="aser", rank=4, alpha_grid=(0.3, 0.6), outlier_grid=(0, 2)),  # a search
    MethodConfig(method="rtn", rank=0),
], ids=["aser", "aser-search", "rtn"])
def test_split_work_equals_the_sequential_reference_bit_for_bit(cfg):
    model = _tiny("gqa").float()
    config_dict = model.config.to_dict()
    tensors, parts = _parts(model)
    names = [g.name for g in groups_for(model.config)]
    sm_ref, ref = quantize_layer(tensors, reduce_parts(parts), cfg, model.config)

    travelling = [split_parts(p, names) for p in parts]  # (channels, *grams) per worker
    gram_reads = []

    def gram_parts(g):
        gram_reads.append(g)
        return (t[1 + g] for t in travelling)

    outs = layer_tasks.smooth_task(config_dict, 0, cfg, tensors, 0, 0.0, "sha", None,
                                   (t[0] for t in travelling), gram_parts)
    meta, payloads, weights = outs[0], outs[1 : 1 + len(names)], outs[1 + len(names):]
    # The smoothing reads the Grams only to score a search's candidates.
    assert gram_reads == (list(range(len(names))) if cfg.alpha_grid else [])
    assert meta.choices == sm_ref.choices
    for lin, W, g in zip(meta.linear_names, weights, layer_tasks.linear_group_index(config_dict), strict=True):
        assert torch.equal(W, sm_ref.tensors[f"{lin}.weight"]), lin
        res = layer_tasks.reconstruct_task(W, payloads[g], cfg, lambda g=g: (t[1 + g] for t in travelling))
        for field in ("q", "scale", "L_A", "L_B"):
            a, b = getattr(res, field), getattr(ref[lin], field)
            assert (a is None and b is None) or torch.equal(a, b), (lin, field)


def test_a_failed_factorization_refills_the_gram_from_its_parts():
    """With the Gram handed over, the whitening factors it in place; an attempt that fails has
    overwritten it, so the task sums the parts into it again before the next (more damped) one.
    The factor is the one the copying path computes."""
    K = 24
    x = torch.randn(256, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    part = x.T @ x
    part[-1, -1] = -0.5 * part.diagonal().mean()  # indefinite: λ = 0.01 and 0.1 fail, 1.0 holds
    halves = [part / 2, part / 2]
    S_copy, lam, attempts = damped_cholesky(part.clone(), 0.01)
    assert attempts == 3
    fills = []

    def refill(buf):
        fills.append(1)
        buf.copy_(halves[0]).add_(halves[1])

    G = part.clone()
    S, lam2, attempts2 = damped_cholesky(G, 0.01, refill=refill)
    assert S.data_ptr() == G.data_ptr() and len(fills) == attempts - 1 and (lam2, attempts2) == (lam, attempts)
    assert torch.equal(S, S_copy)

    # The same through a reconstruction task: each attempt after the first reads the parts again.
    W = torch.randn(16, K, generator=torch.Generator().manual_seed(1))
    st = GroupStats(part, x.abs().amax(0), x.abs().sum(0), 256)
    cfg = MethodConfig(method="aser", rank=4)
    reads = []

    def gram_parts():
        reads.append(1)
        return iter(halves)

    res = layer_tasks.reconstruct_task(W, layer_tasks.GroupPayload(st.channels, None, None), cfg, gram_parts)
    ref = reconstruct_linear(W, GroupStats((part / 2) + (part / 2), st.absmax, st.abs_sum, 256), None, cfg,
                             scale_dtype=W.dtype)
    assert len(reads) == attempts
    for field in ("q", "scale", "L_A", "L_B"):
        assert torch.equal(getattr(res, field), getattr(ref, field)), field
