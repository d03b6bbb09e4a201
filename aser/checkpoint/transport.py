"""Tensors that cross Ray's object store without a private copy in every reader.

Ray pickles a torch tensor in-band: every process that gets the object deserializes its own copy
of the bytes (a Llama-3-70B layer: 1.6 GiB in each calibration actor and in the smoothing task,
beside the object store's copy they also map). A numpy array travels out-of-band (pickle
protocol 5) and a reader gets a read-only view of the object store's bytes instead. numpy has no
bfloat16, so each tensor goes as its raw bytes (a flat uint8 array) with its dtype and shape,
and comes back as a torch view of those bytes: no copy on either side of the store.

The views are read-only memory: whoever needs to change a tensor copies it first (``.to(...,
copy=True)``, ``.clone()``); the layer builders and the smoothing's folds only read them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


def array_view(a: np.ndarray) -> torch.Tensor:
    """A torch tensor on ``a``'s memory, no copy, read-only arrays included (Ray's are)."""
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; its callers only read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


@dataclass(frozen=True)
class SharedTensors:
    """Named tensors as raw bytes (``of``), back as torch views of them (``tensors``)."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> SharedTensors:
        arrays, dtypes, shapes = {}, {}, {}
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            arrays[name] = t.reshape(-1).view(torch.uint8).numpy()  # the same memory
            dtypes[name], shapes[name] = t.dtype, tuple(t.shape)
        return cls(arrays, dtypes, shapes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Each tensor, viewing the bytes this object holds (read-only where Ray handed them out)."""
        out = {}
        for name, a in self.arrays.items():
            if a.size == 0:  # no bytes to view (torch cannot reinterpret an empty buffer)
                out[name] = torch.empty(self.shapes[name], dtype=self.dtypes[name])
                continue
            out[name] = array_view(a).view(self.dtypes[name]).view(self.shapes[name])
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def as_tensors(x: SharedTensors | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of either form (a caller in the same process may pass a plain mapping)."""
    return x.tensors() if isinstance(x, SharedTensors) else dict(x)
