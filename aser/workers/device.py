"""Which device a worker computes on, and what it used there.

One rule for every process kind: compute on the GPU when the process was given one (Ray sets
``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned) and torch can use it; otherwise on the CPU. The
same code runs on both: tensors are moved to the device on the way in and back to the CPU on the
way out (what travels between processes is always on the CPU, so a task's output never depends
on where its consumer runs).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def worker_device(use_gpu: bool) -> torch.device:
    """cuda (the first GPU this process sees) when asked for and available, else cpu."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def device_info(device: torch.device) -> dict[str, Any]:
    """Where this process computes, for the manifest: the device, the GPUs Ray assigned (as
    ``CUDA_VISIBLE_DEVICES`` names them; also set for a cluster's advertised GPUs when torch
    cannot use them), the Ray node, and the peak GPU memory allocated."""
    info: dict[str, Any] = {"device": device.type, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    ray = sys.modules.get("ray")  # only when this process is a Ray worker: no import of Ray here
    if ray is not None and ray.is_initialized():
        info["node_id"] = ray.get_runtime_context().get_node_id()
    info["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return info


def _register_stack_dump() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr (a Ray worker's log file),
    without stopping the process: how a run that stalls on a remote machine is diagnosed
    (``benchmarks/gpu_check.sh`` does it to a step that overruns its time)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (RuntimeError, ValueError):  # pragma: no cover - stderr closed or not a main thread
            pass


_register_stack_dump()
