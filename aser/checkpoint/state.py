"""What a run keeps in DEST besides the output: per-worker calibration states at layer
boundaries (``.aser_state/worker-RRRRR-next-LLLLL.pt``, written atomically, so a restarted run
resumes where its workers were) and the record of a written file. Used by the workers that
write them and by the driver that prunes and clears them."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from aser.checkpoint import storage

STATE_DIR = ".aser_state"


class StateError(ValueError):
    """A run's saved state in DEST cannot be used (corrupt, or from another run)."""


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size_bytes: int


def _state_url(dest: str, worker_rank: int, next_layer: int) -> str:
    return storage.join(dest, STATE_DIR, f"worker-{worker_rank:05d}-next-{next_layer:05d}.pt")


def _state_layers(dest: str, worker_rank: int) -> list[int]:
    prefix = f"worker-{worker_rank:05d}-next-"
    out = []
    for name in storage.list_dir(storage.join(dest, STATE_DIR)):
        if name.startswith(prefix) and name.endswith(".pt"):
            try:
                out.append(int(name[len(prefix) : -len(".pt")]))
            except ValueError:
                continue
    return sorted(out)


def save_worker_state(
    dest: str, worker_rank: int, next_layer: int, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Persist one worker's calibration state at a layer boundary (atomically).

    ``next_layer``: the layer these hidden states are the input of; it is part of the file name,
    so states of several boundaries coexist (with overlap, a worker is ahead of the layers the
    manifest records as done). ``tensors`` e.g. {"hidden": (B, T, H)}, moved to CPU.
    """
    buf = io.BytesIO()
    torch.save(
        {"next_layer": int(next_layer), "tensors": {k: v.detach().cpu() for k, v in tensors.items()}},
        buf,
    )
    storage.write_bytes_atomic(_state_url(dest, worker_rank, next_layer), buf.getvalue())


def load_worker_state(
    dest: str, worker_rank: int, next_layer: int | None = None
) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(next_layer, tensors) saved by ``save_worker_state`` for ``next_layer`` (default: the
    latest one saved), or None if there is none."""
    if next_layer is None:
        present = _state_layers(dest, worker_rank)
        if not present:
            return None
        next_layer = present[-1]
    url = _state_url(dest, worker_rank, next_layer)
    if not storage.exists(url):
        return None
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
        return int(obj["next_layer"]), dict(obj["tensors"])
    except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise StateError(
            # torch's messages run to paragraphs of advice about weights_only; one line is enough.
            f"calibration state {storage.redact(url)} is corrupt ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); delete "
            f"{STATE_DIR}/ to recompute it"
        ) from e


def has_worker_state(dest: str, worker_rank: int, next_layer: int) -> bool:
    return storage.exists(_state_url(dest, worker_rank, next_layer))


def latest_common_state(dest: str, worker_ranks: range, at_most: int) -> int:
    """The newest boundary <= ``at_most`` at which every worker in ``worker_ranks`` saved its
    state, or 0 (none: start from the embedding)."""
    common: set[int] | None = None
    for r in worker_ranks:
        layers = {k for k in _state_layers(dest, r) if k <= at_most}
        common = layers if common is None else common & layers
    return max(common or {0})


def prune_worker_states(dest: str, worker_rank: int, before_layer: int) -> None:
    """Delete the worker's states that a resume at ``before_layer`` (the first layer not yet
    recorded done) no longer needs: every one older than the newest one at or before it (the
    boundaries are not all saved: ``pipeline.save_policy``)."""
    present = _state_layers(dest, worker_rank)
    keep = max((k for k in present if k <= before_layer), default=None)
    for k in present:
        if keep is not None and k < keep:
            storage.remove(_state_url(dest, worker_rank, k))


def has_state(dest: str) -> bool:
    """Anything left under DEST's state folder (workers' states, adapter parts)."""
    return bool(storage.list_dir(storage.join(dest, STATE_DIR)))


def clear_state(dest: str) -> None:
    storage.remove(storage.join(dest, STATE_DIR), recursive=True)
