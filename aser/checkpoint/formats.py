"""The output formats a run can write (``export`` writes them, ``pipeline.config`` names them)."""

from __future__ import annotations

from typing import Literal

# w4a8: INT4 weights + dynamic per-token INT8 activations; w4a16: INT4 weights, 16-bit activations.
OutputFormat = Literal["w4a8", "w4a16"]
