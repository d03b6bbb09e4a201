"""Perplexity over fixed windows: the one quality figure every path of the project reports."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all predictions of all windows. windows: (W, L) int64."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)
