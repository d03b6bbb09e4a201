"""The Ray options of the pipeline's tasks, read back from Ray's own remote-function objects."""

from __future__ import annotations

from aser.workers import ray_actors


def test_gpu_tasks_keep_their_worker_process():
    """Ray's default for a task asking for a GPU is max_calls=1: a fresh process (Python, torch,
    a CUDA context) per reconstruction task, about a minute per task on this machine. Every
    task sets max_calls=0 (unlimited) and the reconstruction asks for the GPUs it was given."""
    fns = ray_actors.remote_functions(reconstruct_gpus=0.25)
    for name, fn in fns.items():
        assert fn._default_options["max_calls"] == 0, name
    assert fns["reconstruct"]._default_options["num_gpus"] == 0.25
    assert all(fns[n]._default_options["num_gpus"] == 0 for n in fns if n != "reconstruct")
    assert ray_actors.remote_functions()["reconstruct"]._default_options["num_gpus"] == 0

