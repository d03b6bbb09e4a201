"""The one place (besides the driver) that knows about Ray: workers and tasks as remote objects.

Every retry setting is explicit here, with its reason:

- Calibration actors: ``max_restarts=0``, ``max_task_retries=0``. An actor's value is its state
  (the shard's hidden states); a restarted actor would come back empty and replaying one method
  cannot rebuild it. The driver recovers instead, at the last persisted layer boundary, with new
  actors (``driver.MAX_RECOVERIES``) — the same path as resuming after a driver crash.
- Tasks (layer read, smoothing, reconstruction, writer, copy, finalize): ``max_retries=3`` on system
  failures (the process or its node died). They are pure or idempotent (deterministic names,
  atomic writes), so running one twice gives the same bytes.
- ``retry_exceptions``: only for work that touches storage (the writers, the finalize), and only
  for ``OSError`` (a transient network or object-store error). Math and bad input (ValueError:
  NaN weights, a missing tensor) are deterministic: a retry would fail the same way, so they
  surface at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import ray

from aser.workers import layer_tasks
from aser.workers.calibration import CalibrationWorker

ACTOR_MAX_RESTARTS = 0  # state is not rebuilt by a restart; the driver recovers (see above)
ACTOR_MAX_TASK_RETRIES = 0
TASK_MAX_RETRIES = 3  # pure / idempotent work: safe to rerun after a worker process dies
STORAGE_RETRY_EXCEPTIONS: list[type[BaseException]] = [OSError]  # transient storage errors only
TASK_NUM_CPUS = 1.0  # matches layer_tasks.TASK_THREADS


class PlacedCalibrationWorker(CalibrationWorker):
    """The worker as an actor: also says where it runs (the worker class itself knows no Ray)."""

    def placement(self) -> dict[str, Any]:
        """This actor's process, Ray node, the GPUs Ray gave it and the device it computes on,
        recorded in the manifest (which node did what, with what)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device.type}


def calibration_actor(num_cpus: float, num_gpus: float, memory: int = 0) -> Any:
    """memory: host bytes the actor needs (``pipeline.memory``): Ray places it on a node with that
    much unclaimed and counts it against the node while the actor lives."""
    # A plain dict: Ray's type stubs lag its documented options (max_concurrency, a list for
    # retry_exceptions).
    opts: dict[str, Any] = dict(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
        # One calibration shard per node where possible (per GPU on a real cluster).
        scheduling_strategy="SPREAD",
        # Calls run one at a time, in submission order: collect(i), advance(i), collect(i+1)...
        max_concurrency=1,
    )
    return ray.remote(**opts)(PlacedCalibrationWorker)


def _fetch(refs: list[Any]) -> Iterator[Any]:
    """The objects of ``refs``, fetched one at a time as they are asked for (Ray resolves only
    top-level arguments; a list of refs arrives as refs)."""
    return (ray.get(ref) for ref in refs)


def smooth_streaming(
    config_dict: Mapping[str, Any], layer_idx: int, method: Any, tensors: Any, nbytes: int, read_s: float,
    source_sha256: str, read_process: dict[str, Any], channel_refs: list[Any], gram_refs: list[list[Any]],
    *collected: Any,
) -> tuple[Any, ...]:
    """``layer_tasks.smooth_task`` with the workers' partial statistics fetched one at a time.

    channel_refs: each worker's channel statistics (small); gram_refs[w][g]: worker w's Gram of
    group g, fetched only when the smoothing searches, as ``stats.reduce_grams_into`` asks for
    them, in rank order: each is released before the next is fetched.

    collected: the workers' ``collect`` step infos (small), passed as top-level arguments so
    that Ray starts the task only once every part exists. Started earlier, the task would block
    in ``ray.get`` for the whole forward pass; Ray lends a blocked task's CPU to a new worker
    process, so each layer started fresh processes (Python and torch imports, about 5 s of CPU
    each here) that then idled out: SmolLM2-135M spent more time starting processes than
    forwarding (1.2 s instead of 0.34 s per batch on 2 cores)."""
    del collected
    return layer_tasks.smooth_task(config_dict, layer_idx, method, tensors, nbytes, read_s, source_sha256,
                                   read_process, _fetch(channel_refs), lambda g: _fetch([w[g] for w in gram_refs]))


def reconstruct_streaming(
    W: Any, payload: Any, method: Any, use_gpu: bool, threads: int, gram_refs: list[Any],
) -> Any:
    """``layer_tasks.reconstruct_task`` with the group's Gram parts (one per worker, in rank
    order) fetched one at a time into the task's one Gram buffer: a Llama-3-70B down_proj task
    holds one 6.1 GiB Gram however many workers made parts of it. Ray starts the task once its
    payload exists, which is after every part (the smoothing waited for all collects)."""
    return layer_tasks.reconstruct_task(W, payload, method, lambda: _fetch(gram_refs), use_gpu, threads)


# Calls a worker process serves before it exits: unlimited. Ray's default for a task that asks
# for a GPU is 1 (a new process per call, so that a framework's GPU memory is released), which
# made every reconstruction task pay a fresh Python, torch import and CUDA context: on an H200
# stories260K's first layer did not finish in 75 s, and here, with the cluster's GPUs faked, one
# task took about a minute of imports. The tasks release what they cached instead
# (``layer_tasks.reconstruct_task`` empties torch's CUDA cache before it returns).
TASK_MAX_CALLS = 0


def _task(
    fn: Any, retry_exceptions: bool | list[type[BaseException]], num_cpus: float = 1.0, num_gpus: float = 0.0,
    memory: int = 0,
) -> Any:
    opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, memory=memory, max_retries=TASK_MAX_RETRIES,
                                retry_exceptions=retry_exceptions, max_calls=TASK_MAX_CALLS)
    return ray.remote(**opts)(fn)


def remote_functions(reconstruct_gpus: float = 0.0, memory: Mapping[str, int] | None = None,
                     reconstruct_cpus: float = TASK_NUM_CPUS) -> dict[str, Any]:
    """The tasks, built on first use (ray.remote needs no running cluster, but importing this
    module should not register functions that a caller never uses).

    reconstruct_gpus: GPUs per reconstruction task (a fraction lets several share one GPU, and
    share it with a calibration actor holding the rest); the task computes there when > 0.
    memory: host bytes per task kind (``pipeline.memory``; keys smooth, reconstruct, writer,
    finalize): Ray runs on a node only as many tasks as its memory holds.
    reconstruct_cpus: CPUs per reconstruction task; it runs that many torch threads (pass the
    same number to ``reconstruct_task``'s ``threads``).
    """
    mem = dict(memory or {})
    return {
        "load_layer": _task(layer_tasks.load_layer_task, STORAGE_RETRY_EXCEPTIONS, memory=mem.get("writer", 0)),
        "smooth": _task(smooth_streaming, False, TASK_NUM_CPUS, memory=mem.get("smooth", 0)),
        "reconstruct": _task(reconstruct_streaming, False, reconstruct_cpus, reconstruct_gpus,
                             memory=mem.get("reconstruct", 0)),
        "write_layer": _task(layer_tasks.write_layer_task, STORAGE_RETRY_EXCEPTIONS, memory=mem.get("writer", 0)),
        "copy_stage": _task(layer_tasks.copy_stage_task, STORAGE_RETRY_EXCEPTIONS, memory=mem.get("writer", 0)),
        "finalize": _task(layer_tasks.finalize_task, STORAGE_RETRY_EXCEPTIONS, memory=mem.get("finalize", 0)),
    }
