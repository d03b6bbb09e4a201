"""Checkpoint I/O, the bottom layer: storage URLs (fsspec), safetensors by byte range, decoder
layers built from tensors with transformers' classes, the output format (compressed-tensors base,
PEFT adapter, index) and the per-worker resume states. Imports nothing else of ``aser``."""
