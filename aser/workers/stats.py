"""Per-group calibration statistics: Gram matrix, per-channel absmax, token count.

Accumulated in fp32 on the worker's device (fp64 accumulation on the CPU was the dominant cost
of the prototype: 277 s for SmolLM2 statistics alone), reduced and handed on in fp64. Each
forward batch is summed in fp32 and added to an fp64 running total, so the fp32 rounding error is
bounded by one batch's sum, not by the whole calibration set.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from aser.checkpoint.transport import array_view
from aser.workers.arch import LinearGroup


@dataclass
class ChannelStats:
    """The per-channel part of a group's statistics: all that smoothing needs (a few K floats),
    so that the smoothing task never holds the Gram (6.1 GiB for a 28672-wide down_proj).

    absmax: (K,) float64 max over tokens of |x|; abs_sum: (K,) float64 sum over tokens of |x|;
    num_tokens: int.
    """

    absmax: torch.Tensor
    abs_sum: torch.Tensor
    num_tokens: int

    def merge(self, other: ChannelStats) -> ChannelStats:
        if self.absmax.shape != other.absmax.shape:
            raise ValueError(f"cannot merge stats of {self.absmax.shape[0]} and {other.absmax.shape[0]} channels")
        return ChannelStats(torch.maximum(self.absmax, other.absmax.to(self.absmax.device)),
                            self.abs_sum + other.abs_sum.to(self.abs_sum.device), self.num_tokens + other.num_tokens)

    @property
    def mean_abs(self) -> torch.Tensor:
        """(K,) float64 mean |x_j| over tokens."""
        return self.abs_sum / max(self.num_tokens, 1)

    def to(self, device: torch.device | str) -> ChannelStats:
        return ChannelStats(self.absmax.to(device), self.abs_sum.to(device), self.num_tokens)

    def scaled(self, m: torch.Tensor) -> ChannelStats:
        """Statistics of x / m."""
        m64 = m.to(torch.float64)
        return ChannelStats(self.absmax / m64, self.abs_sum / m64, self.num_tokens)


@dataclass
class GroupStats:
    """Statistics of the input shared by one group of linears.

    gram: (K, K) float64, sum over tokens of x xᵀ; absmax: (K,) float64, max over tokens of |x|;
    abs_sum: (K,) float64, sum over tokens of |x| (L2QER's mean-|x| scale); num_tokens: int.
    """

    gram: torch.Tensor
    absmax: torch.Tensor
    abs_sum: torch.Tensor
    num_tokens: int

    @classmethod
    def of(cls, gram: torch.Tensor, channels: ChannelStats) -> GroupStats:
        return cls(gram, channels.absmax, channels.abs_sum, channels.num_tokens)

    @property
    def channels(self) -> ChannelStats:
        return ChannelStats(self.absmax, self.abs_sum, self.num_tokens)

    def merge(self, other: GroupStats) -> GroupStats:
        if self.gram.shape != other.gram.shape:
            raise ValueError(f"cannot merge stats of shapes {self.gram.shape} and {other.gram.shape}")
        return GroupStats.of(self.gram + other.gram.to(self.gram.device), self.channels.merge(other.channels))

    @property
    def mean_abs(self) -> torch.Tensor:
        """(K,) float64 mean |x_j| over tokens."""
        return self.channels.mean_abs

    def to(self, device: torch.device | str) -> GroupStats:
        return GroupStats(self.gram.to(device), self.absmax.to(device), self.abs_sum.to(device), self.num_tokens)

    def scaled(self, m: torch.Tensor) -> GroupStats:
        """Statistics of x / m: G / (m mᵀ), a / m (exact, no recomputation)."""
        m64 = m.to(torch.float64)
        # Row then column division in place: one new Gram-sized buffer (an outer product
        # m mᵀ would be a second one; a 28672-wide Gram is 6.1 GiB).
        return GroupStats.of((self.gram / m64[:, None]).div_(m64[None, :]), self.channels.scaled(m))


def reduce_stats(parts: Iterable[GroupStats]) -> GroupStats:
    """Sum statistics from several workers/shards (order-independent up to fp64 rounding)."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("reduce_stats: no statistics to reduce")
    return reduce_parts(itertools.chain([{"": first}], ({"": p} for p in it)))[""]


StatsT = TypeVar("StatsT", GroupStats, ChannelStats)


def reduce_parts(parts: Iterable[Mapping[str, StatsT]]) -> dict[str, StatsT]:
    """Sum per-group statistics of several workers ({group: GroupStats or ChannelStats} each), in
    the given order, consuming ``parts`` lazily: a generator that fetches one part at a time keeps
    only that part and the running sums alive."""
    acc: dict[str, StatsT] | None = None
    for part in parts:
        acc = dict(part) if acc is None else {name: acc[name].merge(part[name]) for name in acc}
    if acc is None:
        raise ValueError("reduce_parts: no statistics to reduce")
    return acc


def split_parts(part: Mapping[str, GroupStats], names: Sequence[str]) -> tuple[Any, ...]:
    """One worker's statistics as they travel: the channel statistics of every group (one small
    object), then each group's Gram (in ``names`` order) as its own float64 numpy array. The Grams
    go separately so that each reconstruction task fetches only its group's, and as numpy so
    that Ray stores them without a copy in the worker and hands them out without a copy in the
    reader (a torch tensor is pickled in-band: measured here, a 2 GiB Gram cost its reader
    2.2 GiB of private memory as a tensor and 0.2 GiB as an array)."""
    return ({n: part[n].channels for n in names}, *(part[n].gram.cpu().numpy() for n in names))


def _as_tensor(part: Any) -> torch.Tensor:
    """A Gram part as a tensor without a copy (Ray's arrays are read-only; they are only read)."""
    return part if isinstance(part, torch.Tensor) else array_view(np.asarray(part))


def reduce_grams_into(out: torch.Tensor, parts: Iterable[Any], m: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the workers' Gram parts (in the given order, consumed lazily: one part alive at a
    time) into ``out`` (K, K) float64, then scale it to the smoothed input's, G / (m mᵀ), in place:
    the same operations, in the same order, as ``reduce_parts`` then ``GroupStats.scaled``, so the
    same bits, with no buffer beside ``out``."""
    n = 0
    for n, part in enumerate(parts, 1):
        t = _as_tensor(part)
        if t.shape != out.shape:
            raise ValueError(f"cannot merge stats of shapes {tuple(out.shape)} and {tuple(t.shape)}")
        if n == 1:
            out.copy_(t)
        else:
            out.add_(t.to(out.device))
        del t, part
    if n == 0:
        raise ValueError("reduce_grams_into: no statistics to reduce")
    if m is not None:
        m64 = m.to(device=out.device, dtype=torch.float64)
        out.div_(m64[:, None]).div_(m64[None, :])
    return out


# Columns per block of the Gram's upper triangle (see StatsAccumulator.add).
GRAM_BLOCK = 256


def gram_multiply_adds(K: int, block: int = GRAM_BLOCK) -> int:
    """Multiply-adds per token of ``StatsAccumulator.add``'s Gram (the blocks of the upper
    triangle): about K (K + block) / 2, against K² for a full xᵀx."""
    return sum(min(block, K - i0) * (K - i0) for i0 in range(0, K, block))


def mirror_upper(g: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``g`` (K, K), accumulated by ``StatsAccumulator.add`` (the diagonal blocks whole, the blocks
    right of them), made symmetric in place: each block of rows left of its diagonal block is
    copied from the disjoint block above the diagonal."""
    K = g.shape[0]
    for i0 in range(0, K, block):
        g[i0 : i0 + block, :i0] = g[:i0, i0 : i0 + block].T
    return g


class StatsAccumulator:
    """Accumulates G (fp32 per batch, fp64 total), absmax and token count for inputs (..., K).

    G is symmetric, so each batch computes its upper triangle only, one block of rows at a time
    (xᵀx restricted to columns >= the block's first): about half the multiply-adds of a full
    ``xᵀ @ x`` once K spans several blocks, which is what a BLAS ``syrk`` saves and what torch
    does not expose, on the CPU and the GPU alike. The lower triangle is filled from the upper
    once, when the statistics are handed over.
    """

    def __init__(self, K: int, device: torch.device | str = "cpu") -> None:
        self.K = K
        self._upper = torch.zeros(K, K, dtype=torch.float64, device=device)  # lower: zeros until done
        self._batch_block: torch.Tensor | None = None  # fp32 (block, K), reused by every batch
        self.absmax = torch.zeros(K, dtype=torch.float64, device=device)
        self.num_tokens = 0
        self.abs_sum = torch.zeros(K, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if x2.shape[-1] != self.K:
            raise ValueError(f"expected inputs with {self.K} channels, got {x2.shape[-1]}")
        ax = x2.abs()
        abs_sum = ax.sum(dim=0)
        # A NaN or an infinity anywhere makes its channel's sum of |x| non-finite: checking the K
        # sums costs nothing, where isfinite over the batch cost a fifth of a 1536-wide Gram.
        if not torch.isfinite(abs_sum).all():
            raise FloatingPointError("non-finite activations in calibration statistics")
        # Each block's fp32 product goes into one reused (block, K) buffer and is added into the
        # fp64 total with the cast done elementwise: no K x K temporary per batch (a 28672-wide
        # down_proj: 3.3 GB in fp32, 6.6 GB in fp64), and fp32 rounding bounded by one batch.
        K, block = self.K, min(GRAM_BLOCK, self.K)
        if self._batch_block is None:
            self._batch_block = torch.empty(block, K, dtype=torch.float32, device=x2.device)
        for i0 in range(0, K, block):
            i1 = min(i0 + block, K)
            out = self._batch_block[: i1 - i0, : K - i0]
            torch.mm(x2[:, i0:i1].T, x2[:, i0:], out=out)
            self._upper[i0:i1, i0:] += out
        self.absmax = torch.maximum(self.absmax, ax.amax(dim=0).to(torch.float64))
        self.abs_sum += abs_sum.to(torch.float64)
        self.num_tokens += x2.shape[0]

    def result(self) -> GroupStats:
        """A snapshot; accumulation may go on."""
        return GroupStats(gram=mirror_upper(self._upper.clone()), absmax=self.absmax.clone(), abs_sum=self.abs_sum.clone(),
                          num_tokens=self.num_tokens)

    def take(self) -> GroupStats:
        """The statistics without a copy; the accumulator is spent (its buffers are handed over
        and the fp32 batch buffer is freed)."""
        out = GroupStats(gram=mirror_upper(self._upper), absmax=self.absmax, abs_sum=self.abs_sum,
                         num_tokens=self.num_tokens)
        self._batch_block = None
        del self._upper, self.absmax, self.abs_sum
        return out


def attach_stat_hooks(
    layer: nn.Module, groups: Sequence[LinearGroup]
) -> tuple[list[torch.utils.hooks.RemovableHandle], dict[str, StatsAccumulator]]:
    """Forward pre-hooks on the first linear of each group (the group shares one input).

    Returns the hook handles (remove them when done) and one accumulator per group name.
    """
    handles = []
    accs: dict[str, StatsAccumulator] = {}
    for g in groups:
        lin = layer.get_submodule(g.linears[0])
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{g.linears[0]} is {type(lin).__name__}, expected nn.Linear")
        acc = StatsAccumulator(lin.in_features, device=lin.weight.device if lin.weight.device.type != "meta" else "cpu")
        accs[g.name] = acc

        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], acc: StatsAccumulator = acc) -> None:
            acc.add(args[0])

        handles.append(lin.register_forward_pre_hook(hook))
    return handles, accs
