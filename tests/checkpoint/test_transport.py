"""A layer's tensors cross Ray's object store as raw bytes: every dtype and shape comes back
bit for bit, and a reader's tensors view the store's memory instead of a private copy (the
copy a pickled torch tensor costs each reader: 1.6 GiB per calibration actor at Llama-3-70B
widths)."""

from __future__ import annotations

import pickle

import pytest
import ray
import torch

from aser.checkpoint.transport import SharedTensors, as_tensors

TENSORS = {
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "fp16_scalar": torch.tensor(1.5, dtype=torch.float16),
    "fp32": torch.randn(2, 3, 4),
    "int64": torch.arange(5),
    "empty": torch.empty(0, 3),
    "strided": torch.randn(4, 6)[:, ::2],
}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_every_dtype_and_shape_comes_back_bit_for_bit() -> None:
    shared = SharedTensors.of(TENSORS)
    _same(shared.tensors(), TENSORS)
    _same(pickle.loads(pickle.dumps(shared, protocol=5)).tensors(), TENSORS)
    assert shared.nbytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert as_tensors(TENSORS) == TENSORS and as_tensors(shared).keys() == TENSORS.keys()


@pytest.fixture(scope="module")
def local_ray():
    """A Ray this module starts, or the one an earlier test left running."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@ray.remote
def _read(shared: SharedTensors) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """In a worker: the tensors, whether the bytes were handed over read-only (the store's
    memory, not a copy), and whether the tensors view those bytes."""
    views = shared.tensors()
    a = shared.arrays["fp32"]
    read_only = not a.flags.writeable
    same_memory = views["fp32"].data_ptr() == a.__array_interface__["data"][0]
    return {k: v.clone() for k, v in views.items()}, read_only, same_memory


def test_a_reader_views_the_object_stores_bytes(local_ray) -> None:
    ref = ray.put(SharedTensors.of(TENSORS))
    tensors, read_only, same_memory = ray.get(_read.remote(ref))
    _same(tensors, TENSORS)
    assert read_only and same_memory
