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

import torch
from torch import nn

from aser.workers.arch import LinearGroup


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

    def merge(self, other: GroupStats) -> GroupStats:
        if self.gram.shape != other.gram.shape:
            raise ValueError(f"cannot merge stats of shapes {self.gram.shape} and {other.gram.shape}")
        return GroupStats(
            gram=self.gram + other.gram.to(self.gram.device),
            absmax=torch.maximum(self.absmax, other.absmax.to(self.absmax.device)),
            abs_sum=self.abs_sum + other.abs_sum.to(self.abs_sum.device),
            num_tokens=self.num_tokens + other.num_tokens,
        )

    @property
    def mean_abs(self) -> torch.Tensor:
        """(K,) float64 mean |x_j| over tokens."""
        return self.abs_sum / max(self.num_tokens, 1)

    def to(self, device: torch.device | str) -> GroupStats:
        return GroupStats(self.gram.to(device), self.absmax.to(device), self.abs_sum.to(device), self.num_tokens)

    def scaled(self, m: torch.Tensor) -> GroupStats:
        """Statistics of x / m: G / (m mᵀ), a / m (exact, no recomputation)."""
        m64 = m.to(torch.float64)
        # Row then column division in place: one new Gram-sized buffer (an outer product
        # m mᵀ would be a second one; a 28672-wide Gram is 6.1 GiB).
        return GroupStats(
            gram=(self.gram / m64[:, None]).div_(m64[None, :]),
            absmax=self.absmax / m64,
            abs_sum=self.abs_sum / m64,
            num_tokens=self.num_tokens,
        )


def reduce_stats(parts: Iterable[GroupStats]) -> GroupStats:
    """Sum statistics from several workers/shards (order-independent up to fp64 rounding)."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("reduce_stats: no statistics to reduce")
    return reduce_parts(itertools.chain([{"": first}], ({"": p} for p in it)))[""]


def reduce_parts(parts: Iterable[Mapping[str, GroupStats]]) -> dict[str, GroupStats]:
    """Sum per-group statistics of several workers ({group: GroupStats} each), in the given
    order, consuming ``parts`` lazily: a generator that fetches one part at a time keeps only that
    part and the running sums alive."""
    acc: dict[str, GroupStats] | None = None
    for part in parts:
        acc = dict(part) if acc is None else {name: acc[name].merge(part[name]) for name in acc}
    if acc is None:
        raise ValueError("reduce_parts: no statistics to reduce")
    return acc


class StatsAccumulator:
    """Accumulates G (fp32 per batch, fp64 total), absmax and token count for inputs (..., K)."""

    def __init__(self, K: int, device: torch.device | str = "cpu") -> None:
        self.K = K
        self.gram = torch.zeros(K, K, dtype=torch.float64, device=device)
        self._batch_gram: torch.Tensor | None = None  # fp32 (K, K), reused by every batch
        self.absmax = torch.zeros(K, dtype=torch.float64, device=device)
        self.num_tokens = 0
        self.abs_sum = torch.zeros(K, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if x2.shape[-1] != self.K:
            raise ValueError(f"expected inputs with {self.K} channels, got {x2.shape[-1]}")
        if not torch.isfinite(x2).all():
            raise FloatingPointError("non-finite activations in calibration statistics")
        # The batch's Gram into one reused fp32 buffer, then added into the fp64 total with the
        # cast done elementwise: the same values as (x2.T @ x2).to(float64), without a new fp32
        # and a new fp64 K x K temporary per batch (a 28672-wide down_proj: 3.3 + 6.6 GB).
        if self._batch_gram is None:
            self._batch_gram = torch.empty(self.K, self.K, dtype=torch.float32, device=x2.device)
        torch.mm(x2.T, x2, out=self._batch_gram)
        self.gram += self._batch_gram
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0).to(torch.float64))
        self.abs_sum += x2.abs().sum(dim=0).to(torch.float64)
        self.num_tokens += x2.shape[0]

    def result(self) -> GroupStats:
        return GroupStats(
            gram=self.gram.clone(),
            absmax=self.absmax.clone(),
            abs_sum=self.abs_sum.clone(),
            num_tokens=self.num_tokens,
        )

    def take(self) -> GroupStats:
        """The statistics without a copy; the accumulator is spent (its buffers are handed over
        and the fp32 batch buffer is freed)."""
        out = GroupStats(gram=self.gram, absmax=self.absmax, abs_sum=self.abs_sum, num_tokens=self.num_tokens)
        self._batch_gram = None
        del self.gram, self.absmax, self.abs_sum
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
