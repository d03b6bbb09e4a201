import pytest
import torch
from torch import nn

from aser.workers.arch import LinearGroup
from aser.workers.stats import StatsAccumulator, attach_stat_hooks, reduce_stats


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
