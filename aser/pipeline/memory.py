"""The one model of what a run costs: memory per process kind, bytes moved, FLOPs.

Used by the driver (to refuse a run that cannot fit before any work, and to tell Ray how much
memory each actor and task needs, so that Ray places and limits them) and by ``aser plan`` (to
print it). Inputs: the model's shape (config.json and, when present, the safetensors headers),
the calibration size and the resolved resources (``driver.resolve_resources``).

Every term names the buffer it counts; the constants are measured (``BASE_PROCESS_BYTES``: a
Ray worker with torch, transformers, compressed-tensors and aser imported; the coefficients of
the reconstruction's (N, K) float64 temporaries: read off ``reconstruct_linear``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aser.checkpoint.layers import meta_layer
from aser.workers.arch import groups_for
from aser.workers.calibration import FORWARD_BATCH_SIZE, hf_config
from aser.workers.stats import GRAM_BLOCK, gram_multiply_adds

# Peak RSS of a process that has imported what the pipeline imports, before any model data:
# 475-512 MiB measured for every process kind (stories260K, whose tensors are 1 MB).
BASE_PROCESS_BYTES = 500 * 2**20
# A CUDA context and torch's CUDA libraries mapped into host memory.
CUDA_CONTEXT_HOST_BYTES = 1 * 2**30
CUDA_CONTEXT_GPU_BYTES = 600 * 2**20
# Float64 (N, K) buffers alive at once in reconstruct_linear: W64, E, E with the side columns
# zeroed (until the low-rank fit), E S (the SVD's input, then R S in place), R, and W S.
RECONSTRUCT_NK_BUFFERS = 5
# The driver's tokenizer (a fast BPE tokenizer: +50 MB for SmolLM2's 49,152 entries, measured)
# and the transient cost of tokenizing the calibration text (+91 MB for WikiText-2's 1.3 MB test
# split, measured: Python and Rust objects per token).
TOKENIZER_BYTES_PER_ENTRY = 1000
TOKENIZE_BYTES_PER_TEXT_BYTE = 70


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int  # N
    in_features: int  # K


@dataclass(frozen=True)
class ModelShape:
    """What the cost depends on: one decoder layer's linears and groups, and the model's sizes."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    vocab: int
    dtype_bytes: int  # of the checkpoint's tensors (bf16: 2)
    layer_bytes: int  # one decoder layer's tensors on disk
    embed_bytes: int  # embedding + final norm + head
    groups: tuple[tuple[str, int], ...]  # (group name, K) of each linear group
    linears: tuple[Linear, ...]

    @classmethod
    def from_config(cls, config_dict: dict[str, Any], dtype_bytes: int | None = None) -> ModelShape:
        """From config.json alone (shapes from transformers' own layer class, built on meta)."""
        hf = hf_config(config_dict)
        layer = meta_layer(hf)
        if dtype_bytes is None:
            name = str(config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32")
            dtype_bytes = torch.empty((), dtype=getattr(torch, name.removeprefix("torch."))).element_size()
        params = sum(p.numel() for p in layer.state_dict().values())
        linears = []
        groups = []
        for g in groups_for(hf):
            for lin in g.linears:
                mod = layer.get_submodule(lin)
                assert isinstance(mod, torch.nn.Linear), lin
                linears.append(Linear(lin, mod.out_features, mod.in_features))
            groups.append((g.name, next(lin.in_features for lin in linears if lin.name == g.linears[0])))
        H, V = int(hf.hidden_size), int(hf.vocab_size)
        tied = bool(config_dict.get("tie_word_embeddings", False))
        return cls(
            num_layers=int(hf.num_hidden_layers), hidden=H, intermediate=int(hf.intermediate_size),
            num_heads=int(hf.num_attention_heads), vocab=V, dtype_bytes=dtype_bytes,
            layer_bytes=params * dtype_bytes, embed_bytes=(V * H * (1 if tied else 2) + H) * dtype_bytes,
            groups=tuple(groups), linears=tuple(linears),
        )

    @classmethod
    def from_checkpoint(cls, config_dict: dict[str, Any], index: Any | None) -> ModelShape:
        """As ``from_config``, with the element size of the decoder layers' tensors read from the
        safetensors headers (``index``: a ``safetensors_io.SourceIndex``) when there are any."""
        from aser.checkpoint.safetensors_io import DTYPES

        sizes = [DTYPES[t.dtype].itemsize for t in (index.tensors.values() if index is not None else ())
                 if t.name.startswith("model.layers.") and t.dtype in DTYPES]
        return cls.from_config(config_dict, max(sizes) if sizes else None)

    @property
    def gram_elements(self) -> int:
        """Σ K² over the groups: the statistics of one layer (one Gram per group)."""
        return sum(k * k for _, k in self.groups)

    @property
    def layer_params(self) -> int:
        return self.layer_bytes // self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        """One (vocab, hidden) matrix: the embedding, or an untied head."""
        return self.vocab * self.hidden * self.dtype_bytes


@dataclass
class ProcessCost:
    kind: str
    count: int  # at once (actors: per run; tasks: at most in flight)
    peak_host_bytes: int
    peak_gpu_bytes: int
    terms: dict[str, int] = field(default_factory=dict)  # what the peak is made of


@dataclass
class RunCost:
    processes: list[ProcessCost]
    bytes_read: int
    bytes_written: int
    object_store_bytes_per_layer: int
    flops: dict[str, float]

    def by_kind(self) -> dict[str, ProcessCost]:
        return {p.kind: p for p in self.processes}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    shape: ModelShape, num_samples: int, seq_len: int, num_workers: int, gpus_per_worker: float,
    reconstruct_gpus: float, rank: int, num_outliers: int, inflight_layers: int = 2, calib_text_bytes: int = 0,
) -> RunCost:
    """Peak memory of each process kind, bytes moved and FLOPs of a run (see the module doc)."""
    H, I, T = shape.hidden, shape.intermediate, seq_len
    on_gpu = gpus_per_worker > 0
    # workers.calibration.compute_dtype: 16-bit checkpoints run in float32 on a CPU.
    act = shape.dtype_bytes if on_gpu else 4
    layer_compute = shape.layer_params * act  # the built layer, in the compute dtype
    shard = math.ceil(num_samples / num_workers)
    batch = min(FORWARD_BATCH_SIZE, shard)
    stats64 = 8 * sum(k * k + 2 * k for _, k in shape.groups)
    stats32 = 4 * sum(min(GRAM_BLOCK, k) * k for _, k in shape.groups)  # the fp32 batch blocks
    k_max = max(k for _, k in shape.groups)
    # One batch's activations: the MLP's gate/up/product (B, T, I) in the compute dtype, the
    # attention scores (B, heads, T, T) in fp32, and a statistics hook's fp32 copy of its input.
    forward = batch * T * (3 * I * act + 4 * k_max) + 4 * batch * shape.num_heads * T * T
    hidden = 2 * shard * T * H * act  # the shard's inputs and the layer's outputs
    # The embedding is read on the host (raw bytes, then the tensor) to embed the shard; the layer
    # arrives from the object store and is built in the compute dtype on the worker's device;
    # the statistics accumulate there and are moved to the host and serialized into the object
    # store when collect returns them.
    host_terms = {"embedding": 2 * shape.embedding_bytes, "layer_shared": shape.layer_bytes,
                  "stats_serialized": stats64}
    device_terms = {"hidden_states": hidden, "layer_built": layer_compute, "stats_fp64": stats64,
                    "stats_fp32_batch": stats32, "forward_batch": forward}
    if on_gpu:
        host_terms["stats_on_host"] = stats64
        calib = ProcessCost("calibration", num_workers,
                            BASE_PROCESS_BYTES + CUDA_CONTEXT_HOST_BYTES + sum(host_terms.values()),
                            CUDA_CONTEXT_GPU_BYTES + sum(device_terms.values()), {**host_terms, **device_terms})
    else:
        calib = ProcessCost("calibration", num_workers,
                            BASE_PROCESS_BYTES + sum(host_terms.values()) + sum(device_terms.values()), 0,
                            {**host_terms, **device_terms})

    # Smoothing: one worker's partial statistics at a time (ray_actors.smooth_streaming), the
    # running sum and the next sum while it is formed, the statistics of the smoothed input, the
    # layer (shared) and its folded copy.
    parts = num_workers * stats64  # what the object store holds per layer
    smooth_terms = {"stats_part": stats64, "stats_sum": 2 * stats64 if num_workers > 1 else 0,
                    "stats_smoothed": stats64, "layer_read": shape.layer_bytes, "layer_folded": shape.layer_bytes}
    smooth = ProcessCost("smooth", inflight_layers, BASE_PROCESS_BYTES + sum(smooth_terms.values()), 0, smooth_terms)

    big = max(shape.linears, key=lambda lin: (lin.in_features ** 2 + RECONSTRUCT_NK_BUFFERS * lin.out_features
                                               * lin.in_features))
    N, K = big.out_features, big.in_features
    rec_terms = {"gram": 8 * K * K, "cholesky_factor": 8 * K * K, "weight": shape.dtype_bytes * N * K,
                 "nk_float64": RECONSTRUCT_NK_BUFFERS * 8 * N * K}
    rec_tasks = len(shape.linears) * inflight_layers
    if reconstruct_gpus > 0:
        rec = ProcessCost("reconstruct", rec_tasks,
                          BASE_PROCESS_BYTES + CUDA_CONTEXT_HOST_BYTES + 8 * K * K + shape.dtype_bytes * N * K,
                          CUDA_CONTEXT_GPU_BYTES + sum(rec_terms.values()), rec_terms)
    else:
        rec = ProcessCost("reconstruct", rec_tasks, BASE_PROCESS_BYTES + sum(rec_terms.values()), 0, rec_terms)

    r_total = rank + num_outliers
    adapter_layer = sum((lin.out_features + lin.in_features) * r_total for lin in shape.linears) * shape.dtype_bytes
    codes = shape.layer_params  # int8 codes (w4a8) on disk: one byte per weight
    # The embedding and head stages are copied by the same kind of task: read bytes, tensor,
    # serialized shard.
    write_terms = {"codes": codes, "fp_tensors": shape.layer_bytes, "adapter_part": adapter_layer,
                   "stage_copy": 3 * shape.embedding_bytes}
    writer = ProcessCost("writer", inflight_layers, BASE_PROCESS_BYTES + sum(write_terms.values()), 0, write_terms)
    # Finalize streams the merged adapter layer by layer (``export._write_adapter``): one stage's
    # part, read whole (the bytes read and the tensors), and the padded copy of its largest tensor.
    largest_adapter_tensor = max(max(lin.out_features, lin.in_features) for lin in shape.linears) * r_total
    fin_terms = {"adapter_part": 2 * adapter_layer, "padded_tensor": largest_adapter_tensor * shape.dtype_bytes}
    finalize = ProcessCost("finalize", 1, BASE_PROCESS_BYTES + sum(fin_terms.values()), 0, fin_terms)
    driver_terms = {"tokenizer": TOKENIZER_BYTES_PER_ENTRY * shape.vocab,
                    "calibration_text": TOKENIZE_BYTES_PER_TEXT_BYTE * calib_text_bytes,
                    "tokens": 8 * num_samples * seq_len}
    driver = ProcessCost("driver", 1, BASE_PROCESS_BYTES + sum(driver_terms.values()), 0, driver_terms)

    L = shape.num_layers
    tokens = num_samples * seq_len
    # Each layer is read once (``load_layer_task``; the workers and the smoothing share it
    # through the object store); each worker reads the embedding, the copy tasks read the
    # embedding and head stages.
    bytes_read = L * shape.layer_bytes + shape.embedding_bytes * num_workers + shape.embed_bytes
    bytes_written = L * (codes + adapter_layer) + shape.embed_bytes
    # Per layer in the object store: the layer as read, the statistics parts and the smoothed
    # statistics, the folded layer, the results.
    store = shape.layer_bytes + parts + stats64 + shape.layer_bytes + codes + adapter_layer
    flops = {
        "calibration_forward": float(L * tokens * (2 * shape.layer_params + 2 * T * H)),
        "statistics": float(L * tokens * 2 * sum(gram_multiply_adds(k) for _, k in shape.groups)),
        "cholesky": float(L * sum(lin.in_features ** 3 / 3 for lin in shape.linears)),
        # E S for the whitened SVD and W S for the reference error (2 N K² each); the other
        # errors come from E S (reconstruct_linear)
        "reconstruct_products": float(L * sum(4 * lin.out_features * lin.in_features ** 2 for lin in shape.linears)),
    }
    return RunCost([driver, calib, smooth, rec, writer, finalize], bytes_read, bytes_written, store, flops)


# The per-layer task kinds: transient, where a calibration actor holds its resources for the run.
TASK_KINDS = ("smooth", "reconstruct", "writer", "finalize")


def tasks_blocked_by_actors(cost: RunCost, offered_bytes: float) -> str | None:
    """Why no per-layer task could ever start beside the calibration actors on a cluster whose
    nodes offer ``offered_bytes`` of memory in all, or None. Ray holds an actor's ``memory`` for
    its whole life, and every layer needs its tasks (read, smooth, reconstruct, write): when what
    the actors hold plus the largest task exceeds the cluster's memory, that task is never
    scheduled and the run waits forever without an error (seen: stories260K, 2 workers, a
    1.3 GiB Ray instance). On one node this is exact; on several, necessary only (Ray may still
    fragment what is left)."""
    kinds = cost.by_kind()
    actors = kinds["calibration"]
    held = actors.count * actors.peak_host_bytes
    task = max((kinds[k] for k in TASK_KINDS), key=lambda p: p.peak_host_bytes)
    if held + task.peak_host_bytes <= offered_bytes:
        return None
    return (f"{actors.count} calibration worker(s) hold {actors.count} x {actors.peak_host_bytes / 2**30:.1f} GiB "
            f"of host memory for the whole run and a {task.kind} task needs {task.peak_host_bytes / 2**30:.1f} GiB "
            f"beside them: {(held + task.peak_host_bytes) / 2**30:.1f} GiB, where the cluster offers "
            f"{offered_bytes / 2**30:.1f} GiB in all")
