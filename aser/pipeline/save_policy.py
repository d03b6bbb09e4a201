"""When the calibration workers persist their hidden states at a layer boundary.

A saved boundary is what a resume (after a driver crash, or a worker's death) restarts from; a
boundary without one costs the forward passes from the last saved boundary before it, redone in
the catch-up. Saving every boundary was 21 s of SmolLM2-135M's 554 s run (2.5 GB of state for a
0.54 GB model), so by default the driver saves only when the forward work since the last save
has grown to ``1 / SAVE_SHARE`` times what one save costs: saves then take at most about
``SAVE_SHARE`` of the workers' time, and a crash redoes at most about ``save_s / SAVE_SHARE``
seconds of forward passes. ``RunConfig.save_state_every`` fixes the interval instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SAVE_SHARE = 0.02


@dataclass
class SavePolicy:
    """Decides, per boundary, whether the workers save; learns the costs from recorded layers.

    every: save boundaries that are multiples of it (a fixed interval), or None (by cost).
    """

    every: int | None = None
    share: float = SAVE_SHARE
    save_s: float | None = None  # the latest save's seconds (the slowest worker's)
    forward_s: float | None = None  # the latest layer's forward seconds (the slowest worker's)
    last_saved: int = 0  # the newest boundary a save was asked for (0: the embedding, recomputed)

    def due(self, boundary: int) -> bool:
        """Whether the workers save their inputs of layer ``boundary`` (asked in layer order)."""
        if self.every is not None:
            save = boundary % self.every == 0
        elif self.save_s is None or self.forward_s is None:
            save = True  # nothing measured yet: this save measures what one costs
        else:
            save = (boundary - self.last_saved) * self.forward_s * self.share >= self.save_s
        if save:
            self.last_saved = boundary
        return save

    def observe(self, seconds: Mapping[str, float]) -> None:
        """A recorded layer's seconds per stage (``forward``; ``save_state`` when it saved)."""
        if "forward" in seconds:
            self.forward_s = float(seconds["forward"])
        if "save_state" in seconds:
            self.save_s = float(seconds["save_state"])
