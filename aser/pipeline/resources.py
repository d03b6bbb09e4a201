"""What a run asks Ray for: the config's worker fields, with ``None`` (auto) filled from the
cluster's resources, and refused when the cluster can never grant it (Ray would wait forever).
The driver resolves against ``ray.cluster_resources()``; ``aser plan`` against a device profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aser.pipeline.config import WorkersConfig
from aser.workers.ray_actors import TASK_NUM_CPUS

# Defaults on a cluster with GPUs: each GPU hosts one calibration actor (half of it: its forward
# is short and memory-bound) and shares the rest among reconstruction tasks (Cholesky, SVD,
# GPTQ of one linear each), so both kinds of work use every GPU and neither can starve the other.
CALIB_GPU_FRACTION = 0.5
RECONSTRUCT_GPU_FRACTION = 0.25


# CPUs of a node left to the tasks (smoothing, reconstruction, writing) when the calibration
# workers' CPUs default to the rest of it.
TASK_CPUS_RESERVED = 1


def default_cpus_per_worker(num_workers: int, gpus_per_worker: float, node_cpus: Sequence[float],
                            task_cpus: int = TASK_CPUS_RESERVED) -> float:
    """A GPU worker: 1 CPU (its forward runs on the GPU). A CPU worker: its node's CPUs shared
    among the workers spread onto that node, less ``task_cpus`` for one task at a time, so that
    a worker running alone uses the machine (its forward is the run's critical path); at least 1."""
    if gpus_per_worker > 0 or not node_cpus:
        return 1.0
    per_node = -(-num_workers // len(node_cpus))
    return float(max(1, int((min(node_cpus) - task_cpus) // per_node)))


class ResourceError(ValueError):
    """The requested resources exceed what the cluster has; the message says which and how much."""


@dataclass(frozen=True)
class Resources:
    """What the run asks Ray for, resolved from the config and the cluster's resources."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    reconstruct_gpus: float
    cluster_gpus: float
    reconstruct_cpus: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def workers_config(self) -> WorkersConfig:
        return WorkersConfig(num_workers=self.num_workers, num_cpus_per_worker=self.cpus_per_worker,
                             num_gpus_per_worker=self.gpus_per_worker, reconstruct_gpus=self.reconstruct_gpus,
                             reconstruct_cpus=self.reconstruct_cpus)


def resolve_resources(wc: WorkersConfig, cluster: dict[str, float], node_cpus: Sequence[float] = ()) -> Resources:
    """Fill the config's ``None`` (auto) fields from ``ray.cluster_resources()`` (and the CPUs of
    each live node), and refuse what the cluster can never grant (Ray would wait for it forever)."""
    gpus = float(cluster.get("GPU", 0.0))
    num_workers = wc.num_workers if wc.num_workers is not None else max(1, int(gpus))
    per_worker = wc.num_gpus_per_worker
    if per_worker is None:
        per_worker = CALIB_GPU_FRACTION if gpus >= num_workers * CALIB_GPU_FRACTION else 0.0
    recon = wc.reconstruct_gpus
    if recon is None:
        recon = RECONSTRUCT_GPU_FRACTION if gpus > 0 else 0.0
    if num_workers * per_worker > gpus:
        raise ResourceError(
            f"{num_workers} calibration worker(s) x {per_worker:g} GPU need {num_workers * per_worker:g} GPUs; "
            f"the Ray cluster has {gpus:g}. Lower --workers or --gpus-per-worker"
        )
    if recon > 0 and (gpus == 0 or (per_worker >= 1 and num_workers >= gpus)):
        raise ResourceError(
            f"reconstruction tasks ask for {recon:g} GPU each, but the cluster's {gpus:g} GPU(s) would be "
            f"held whole by the calibration workers ({num_workers} x {per_worker:g}); give the workers "
            "a fraction (--gpus-per-worker 0.5) or set --reconstruct-gpus 0"
        )
    cpus = float(cluster.get("CPU", 0.0))
    cpw = wc.num_cpus_per_worker
    if cpw is None:
        cpw = default_cpus_per_worker(num_workers, per_worker, node_cpus, max(TASK_CPUS_RESERVED, wc.reconstruct_cpus))
    largest = max(node_cpus, default=cpus)
    if wc.reconstruct_cpus > largest:
        raise ResourceError(f"reconstruction tasks ask for {wc.reconstruct_cpus} CPUs each; the largest Ray node "
                            f"has {largest:g}. Lower --reconstruct-cpus")
    if num_workers * cpw > cpus:
        raise ResourceError(
            f"{num_workers} calibration worker(s) x {cpw:g} CPU need {num_workers * cpw:g} CPUs; "
            f"the Ray cluster has {cpus:g}"
        )
    # The actors hold their CPUs for the whole run; every layer's tasks (1 CPU each, a
    # reconstruction --reconstruct-cpus) need some beside them, or they wait forever without an
    # error (seen: --workers 2 --cpus-per-worker 1 on 2 CPUs). Exact on one node, necessary on several.
    task_cpus = max(TASK_NUM_CPUS, wc.reconstruct_cpus)
    if num_workers * cpw + task_cpus > cpus:
        raise ResourceError(
            f"{num_workers} calibration worker(s) x {cpw:g} CPU hold {num_workers * cpw:g} of the Ray cluster's "
            f"{cpus:g} CPUs for the whole run, leaving fewer than the {task_cpus:g} a layer's tasks need: the run "
            "would wait forever. Lower --workers or --cpus-per-worker"
        )
    return Resources(num_workers, cpw, per_worker, recon, gpus, wc.reconstruct_cpus)
