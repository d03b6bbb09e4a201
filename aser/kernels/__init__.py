"""Numerics: quantizers (pure torch references) and the Triton kernels that must match them."""
