"""ASER: activation smoothing + low-rank error reconstruction for W4A8 LLM quantization."""

__version__ = "0.1.0"
