"""A torch dispatch mode that counts the new large buffers the ops under it create."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class GramSizedAllocations(TorchDispatchMode):
    """Counts the new buffers at least ``nbytes`` large that the ops under it create (outputs that
    share no storage with an input: views and in-place results are not new memory)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.count = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                if t.untyped_storage().data_ptr() not in seen:
                    self.count += 1
                    seen.add(t.untyped_storage().data_ptr())
        return out
