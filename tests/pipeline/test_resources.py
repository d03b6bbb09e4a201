"""What a run asks Ray for when the config leaves it to the cluster (pipeline.resources)."""

from __future__ import annotations

import pytest

from aser.pipeline.config import WorkersConfig
from aser.pipeline.resources import ResourceError, resolve_resources


def _resolve(cpus: list[float], gpus: float = 0.0, **kw) -> tuple[float, int]:
    res = resolve_resources(WorkersConfig(**kw), {"CPU": sum(cpus), "GPU": gpus}, cpus)
    return res.cpus_per_worker, res.num_workers


def test_a_cpu_worker_running_alone_gets_the_machine_less_the_tasks_share() -> None:
    # A local Ray on a 2-core machine advertises cores + 1 (driver._init_ray): the worker's
    # forward gets both cores, one task at a time runs beside it.
    assert _resolve([3.0]) == (2.0, 1)
    assert _resolve([17.0]) == (16.0, 1)
    # Workers spread over nodes share their node's CPUs; never less than one.
    assert _resolve([17.0, 17.0], num_workers=4) == (8.0, 4)
    assert _resolve([5.0], num_workers=4) == (1.0, 4)
    # Tasks that ask for more CPUs leave the worker less.
    assert _resolve([5.0], reconstruct_cpus=2) == (3.0, 1)
    # A GPU worker forwards on its GPU: one CPU. An explicit value is kept.
    assert _resolve([16.0, 16.0], gpus=2.0) == (1.0, 2)
    assert _resolve([16.0], num_cpus_per_worker=3.0) == (3.0, 1)


def test_tasks_larger_than_any_node_are_refused() -> None:
    with pytest.raises(ResourceError, match="reconstruction tasks ask for 8 CPUs each; the largest Ray node has 4"):
        _resolve([4.0, 4.0], reconstruct_cpus=8)


def test_actors_that_leave_no_cpu_for_a_task_are_refused() -> None:
    """Actors hold their CPUs for the whole run; a layer's tasks need one (or --reconstruct-cpus)
    beside them, or Ray leaves them pending forever (seen: 2 workers x 1 CPU on 2 CPUs hung)."""
    with pytest.raises(ResourceError, match=r"^2 calibration worker\(s\) x 1 CPU hold 2 of the Ray cluster's 2 CPUs "
                                            r"for the whole run, leaving fewer than the 1 a layer's tasks need"):
        _resolve([2.0], num_workers=2, num_cpus_per_worker=1.0)
    with pytest.raises(ResourceError, match="leaving fewer than the 3 a layer's tasks need"):
        _resolve([4.0], num_workers=2, num_cpus_per_worker=1.0, reconstruct_cpus=3)
    assert _resolve([3.0], num_workers=2, num_cpus_per_worker=1.0) == (1.0, 2)
    assert _resolve([2.0], num_workers=2, num_cpus_per_worker=0.5) == (0.5, 2)
