"""The output formats a run can write (``export`` writes them, ``pipeline.config`` names them)."""

from __future__ import annotations

from typing import Literal

# w4a8: INT4 weights + dynamic per-token INT8 activations (compressed-tensors int-quantized, the
# activation quantizer compressed-tensors defines); w4a16: INT4 weights (pack-quantized), 16-bit
# activations; w4a8-marlin: the w4a16 files, computed with the INT8 activations vLLM's Marlin
# kernel makes under VLLM_MARLIN_INPUT_DTYPE=int8 (its own quantizer, config.json says so).
OutputFormat = Literal["w4a8", "w4a16", "w4a8-marlin"]

# The --format names users pick, by the file layout they write.
FORMAT_NAMES = ("w4a8-int", "w4a16-pack")
# What `aser quantize`, `aser simulate` and a recipe without `format:` write and compute: the form
# vLLM serves on NVIDIA GPUs (Marlin; with VLLM_MARLIN_INPUT_DTYPE=int8 as W4A8, the arithmetic
# the run models). vLLM routes w4a8-int to a scheme with no CUDA kernel ("Failed to find a
# kernel", llm-compressor #2693): it serves on CPU/Arm/XPU backends only. README "Serving".
DEFAULT_FORMAT = "w4a16-pack"
