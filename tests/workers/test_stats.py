import pytest
import torch
from alloc_spy import GramSizedAllocations
from torch import nn

from aser.workers.arch import LinearGroup
from aser.workers.stats import GRAM_BLOCK, GroupStats, StatsAccumulator, attach_stat_hooks, reduce_stats


def test_batched_fp32_accumulation_matches_fp64_reference():
    torch.manual_seed(0)
    X = torch.randn(4096, 48, dtype=torch.float64) * torch.logspace(-1, 1, 48)
    acc = StatsAccumulator(48)
    for chunk in X.split(500):
        acc.add(chunk.float())
    st = acc.result()
    ref = X.T @ X
    # fp32 per batch: relative error ~ sqrt(batch) * 2^-24 of the entries' magnitude.
    assert (st.gram - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(st.absmax, X.abs().amax(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.mean_abs, X.abs().mean(0), rtol=1e-5, atol=0)
    assert st.num_tokens == 4096 and st.gram.dtype == torch.float64


def test_reduce_over_shards_equals_whole():
    torch.manual_seed(1)
    X = torch.randn(900, 16)
    whole, parts = StatsAccumulator(16), [StatsAccumulator(16) for _ in range(3)]
    whole.add(X)
    for p, chunk in zip(parts, X.chunk(3)):
        p.add(chunk)
    red = reduce_stats(p.result() for p in parts)
    ref = whole.result().gram
    # Each part is summed in fp32: differences of a few fp32 ulps of the largest entry.
    assert (red.gram - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(red.absmax, whole.result().absmax) and red.num_tokens == 900


def test_scaled_stats_are_stats_of_scaled_inputs():
    torch.manual_seed(2)
    X = torch.randn(300, 8, dtype=torch.float64)
    m = torch.rand(8, dtype=torch.float64) + 0.5
    a, b = StatsAccumulator(8), StatsAccumulator(8)
    a.add(X)
    b.add(X / m)
    sa, sb = a.result().scaled(m), b.result()
    torch.testing.assert_close(sa.gram, sb.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa.absmax, sb.absmax, rtol=1e-6, atol=0)


def test_hooks_see_the_shared_input_once_per_group():
    lin = nn.Sequential()
    lin.add_module("a", nn.Linear(6, 3))
    lin.add_module("b", nn.Linear(6, 2))
    handles, accs = attach_stat_hooks(lin, [LinearGroup("ab", ("a", "b"), "x", "norm")])
    x = torch.randn(5, 6)
    lin.a(x)
    lin.b(x)  # the second linear of the group must not be counted
    for h in handles:
        h.remove()
    assert accs["ab"].num_tokens == 5


def test_non_finite_activations_are_an_error():
    acc = StatsAccumulator(3)
    with pytest.raises(FloatingPointError):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0]]))


def _stats_of(X: torch.Tensor) -> GroupStats:
    acc = StatsAccumulator(X.shape[-1])
    acc.add(X)
    return acc.result()


def test_merge_sums_sums_and_maxes_maxima() -> None:
    a = _stats_of(torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64))
    b = _stats_of(torch.tensor([[-3.0, 1.0]], dtype=torch.float64))
    m = reduce_stats([a, b])
    assert m.absmax.tolist() == [3.0, 4.0] and m.abs_sum.tolist() == [6.0, 5.5] and m.num_tokens == 3
    assert m.mean_abs.tolist() == [2.0, 5.5 / 3]
    torch.testing.assert_close(m.gram, a.gram + b.gram, rtol=0, atol=0)


def test_merge_refuses_other_widths_and_reduce_refuses_nothing() -> None:
    with pytest.raises(ValueError, match="cannot merge stats of shapes"):
        _stats_of(torch.ones(2, 3)).merge(_stats_of(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="^reduce_stats: no statistics to reduce$"):
        reduce_stats([])
    with pytest.raises(ValueError, match="expected inputs with 3 channels, got 4"):
        StatsAccumulator(3).add(torch.ones(1, 4))


def test_mean_abs_of_no_tokens_is_zero_not_nan() -> None:
    st = StatsAccumulator(4).result()
    assert st.num_tokens == 0 and torch.equal(st.mean_abs, torch.zeros(4, dtype=torch.float64))
    assert st.gram.dtype == st.absmax.dtype == st.abs_sum.dtype == torch.float64  # fp64 before any input


def test_scaled_divides_every_statistic_and_keeps_the_count() -> None:
    st = _stats_of(torch.tensor([[2.0, -6.0], [1.0, 3.0]], dtype=torch.float64))
    sc = st.scaled(torch.tensor([2.0, 3.0]))
    assert sc.absmax.tolist() == [1.0, 2.0] and sc.abs_sum.tolist() == [1.5, 3.0] and sc.num_tokens == 2
    assert sc.gram.tolist() == [[5 / 4, -9 / 6], [-9 / 6, 45 / 9]]


def test_result_is_a_snapshot() -> None:
    acc = StatsAccumulator(2)
    acc.add(torch.ones(1, 2))
    first = acc.result()
    acc.add(torch.full((1, 2), 3.0))
    assert first.gram.tolist() == [[1.0, 1.0], [1.0, 1.0]] and first.abs_sum.tolist() == [1.0, 1.0]
    assert first.absmax.tolist() == [1.0, 1.0] and acc.result().absmax.tolist() == [3.0, 3.0]


def test_hooks_need_linears_and_keep_meta_layers_on_the_cpu() -> None:
    layer = nn.Sequential()
    layer.add_module("norm", nn.LayerNorm(4))
    with pytest.raises(TypeError, match="norm is LayerNorm, expected nn.Linear"):
        attach_stat_hooks(layer, [LinearGroup("g", ("norm",), "x", "norm")])
    with torch.device("meta"):
        meta = nn.Sequential()
        meta.add_module("a", nn.Linear(4, 2))
    handles, accs = attach_stat_hooks(meta, [LinearGroup("g", ("a",), "x", "norm")])
    assert accs["g"].result().gram.device.type == "cpu" and accs["g"].K == 4
    for h in handles:
        h.remove()


def test_accumulation_allocates_no_gram_per_batch_and_take_does_not_copy():
    """Issue 8/9: a 28672-wide down_proj Gram is 3.3 GB in fp32 and 6.6 GB in fp64. The batch
    Gram goes into one reused fp32 buffer and is added into the fp64 total in place (the earlier
    form made a new fp32 and a new fp64 K x K per batch); ``take`` hands the totals over."""
    K = 40
    acc = StatsAccumulator(K)
    xs = [torch.randn(3, 7, K, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    acc.add(xs[0])  # allocates the fp32 batch buffer once
    with GramSizedAllocations(K * K * 4) as mode:
        for x in xs[1:]:
            acc.add(x)
        total = acc.take()
    assert mode.count == 0
    ref = torch.zeros(K, K, dtype=torch.float64)
    for x in xs:
        x2 = x.reshape(-1, K)
        ref += (x2.T @ x2).to(torch.float64)
    # The per-batch fp64 form up to fp32 rounding of one batch's sums (21 tokens: < 1e-6 of them).
    torch.testing.assert_close(total.gram, ref, rtol=1e-6, atol=1e-6)
    assert total.num_tokens == 4 * 21


@pytest.mark.parametrize("K", [200, 3 * GRAM_BLOCK + 100])
def test_gram_is_the_upper_triangle_mirrored_at_about_half_the_multiply_adds(K: int) -> None:
    """Issue 9: the Gram is symmetric; computing its upper triangle by blocks of rows costs
    (nb + 1) / (2 nb) of a full xᵀx for nb blocks; the blocks below the diagonal are exact
    mirrors, and the whole equals the fp64 product up to fp32 rounding."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 256, K, generator=torch.Generator().manual_seed(K))
    acc = StatsAccumulator(K)
    with FlopCounterMode(display=False) as fc:
        acc.add(x)
    nb = -(-K // GRAM_BLOCK)
    full = 2 * 512 * K * K
    counted = fc.get_total_flops()
    assert counted <= full * ((nb + 1) / (2 * nb) + GRAM_BLOCK / K), (counted, full)
    if nb > 1:
        assert counted < 0.75 * full
    g = acc.take().gram
    for i0 in range(GRAM_BLOCK, K, GRAM_BLOCK):  # every block left of the diagonal: the mirror
        assert torch.equal(g[i0 : i0 + GRAM_BLOCK, :i0], g[:i0, i0 : i0 + GRAM_BLOCK].T)
    x64 = x.reshape(-1, K).double()
    torch.testing.assert_close(g, x64.T @ x64, rtol=1e-5, atol=1e-3)


def test_reduce_parts_consumes_one_part_at_a_time():
    """The smoothing task sums the workers' statistics as ``reduce_parts`` pulls them from a
    generator that fetches each from the object store: when part k is fetched, part k - 2 must
    already be gone (part k - 1 is the one being merged), so the task never holds all parts."""
    import gc
    import weakref

    from aser.workers.stats import reduce_parts

    K, parts, alive = 6, [], []

    def fetch():
        for k in range(5):
            gc.collect()
            if k >= 2:
                alive.append(alive_refs[k - 2]() is not None)
            acc = StatsAccumulator(K)
            acc.add(torch.randn(4, K, generator=torch.Generator().manual_seed(k)))
            part = {"g": acc.take()}
            alive_refs.append(weakref.ref(part["g"]))
            parts.append(part["g"].gram.clone())
            yield part

    alive_refs: list = []
    total = reduce_parts(fetch())
    assert alive == [False, False, False]
    assert torch.equal(total["g"].gram, (((parts[0] + parts[1]) + parts[2]) + parts[3]) + parts[4])
