"""Benchmarks of the kernels; run as scripts (``python -m aser.kernels.bench.gemm``), never
imported by the library."""
