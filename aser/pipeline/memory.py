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
from aser.checkpoint.safetensors_io import FINITE_CHECK_BLOCK
from aser.workers.arch import FOLD_ROW_BLOCK, groups_for
from aser.workers.calibration import FORWARD_BATCH_SIZE, hf_config
from aser.workers.stats import GRAM_BLOCK, gram_multiply_adds

# Peak RSS of a process that has imported what the pipeline imports, before any model data:
# 475-512 MiB measured for every process kind (stories260K, whose tensors are 1 MB).
BASE_PROCESS_BYTES = 500 * 2**20
# A CUDA context and torch's CUDA libraries mapped into host memory.
CUDA_CONTEXT_HOST_BYTES = 1 * 2**30
CUDA_CONTEXT_GPU_BYTES = 600 * 2**20
# Float64 (N, K) buffers alive at once in reconstruct_linear (RTN + whitened low rank): E (W
# turned into its quantization error in place) and E S (the SVD's input, then R S in place);
# the Gram is factored in place (``reconstruct_task`` hands its buffer over).
RECONSTRUCT_NK_BUFFERS = 2
# Terms that are pages of Ray's object store a process maps (part of its RSS, paid for by the
# object store, not by the memory Ray is asked to reserve for the process).
SHARED_TERMS = frozenset({"layer_shared", "stats_serialized", "layer_read", "weights_out", "gram_part",
                          "weight_shared", "layer_stored", "stats_previous_layers"})
# The driver's tokenizer (a fast BPE tokenizer: +50 MB for SmolLM2's 49,152 entries, measured)
# and the transient cost of tokenizing the calibration text, the tokenizer's per-byte alignments
# and per-token encodings (peak RSS over WikiText-2's 1.3 MB test split, measured: SmolLM2's
# tokenizer 128 MiB for 305k tokens, 104 B per text byte; stories260K's 512-entry one 189 MiB
# for 815k tokens, 153 B per byte; the larger, as the token count is not known before).
TOKENIZER_BYTES_PER_ENTRY = 1000
TOKENIZE_BYTES_PER_TEXT_BYTE = 155
# The matrix sizes ``plan_cmd.cpu_profile`` times (a local run's preview measures this CPU's
# matmul rates in the driver): per dtype, two float32 random sources, the two operands in the
# dtype and their product; measured: +65 MiB of a fresh driver's RSS, 18 of them BLAS code paged in.
RATE_PROBE_SIZES = {torch.bfloat16: 256, torch.float32: 1536, torch.float64: 1024}
RATE_PROBE_CODE_BYTES = 18 * 2**20


def rate_probe_bytes() -> int:
    return RATE_PROBE_CODE_BYTES + sum(n * n * (2 * 4 + 3 * dt.itemsize) for dt, n in RATE_PROBE_SIZES.items())


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
    """peak_host_bytes: the process's peak RSS (``ru_maxrss``), object-store pages it maps
    included; private_host_bytes: the peak of what is its own (RssAnon), what Ray is asked to
    reserve for it; idle_host_bytes: what an actor holds between its calls."""

    kind: str
    count: int  # at once (actors: per run; tasks: at most in flight)
    peak_host_bytes: int
    peak_gpu_bytes: int
    terms: dict[str, int] = field(default_factory=dict)  # what the peak is made of (its phase's)
    private_host_bytes: int = 0
    idle_host_bytes: int = 0
    phase: str = ""  # which phase of the process the peak is in
    # Peak RSS of each phase: a worker process that ran only some of its kind's tasks (a writer
    # that copied the embedding but wrote no layer) is predicted by the phases it ran.
    phases: dict[str, int] = field(default_factory=dict)


def _phased(kind: str, count: int, phases: dict[str, dict[str, int]], gpu_terms: dict[str, int] | None = None,
            idle: int = 0) -> ProcessCost:
    """A process whose buffers live in phases (a calibration actor's forward, then the return of
    its statistics): the peak is the largest phase's sum, not the sum of every buffer. Its terms:
    the host's peak phase and, on a GPU, the device's (``gpu_terms``, at once)."""
    phase, terms = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    private = max(sum(v for k, v in t.items() if k not in SHARED_TERMS) for t in phases.values())
    gpu = dict(gpu_terms or {})
    return ProcessCost(kind, count, sum(terms.values()), sum(gpu.values()), {**terms, **gpu}, private,
                       idle or private, phase, {name: sum(t.values()) for name, t in phases.items()})


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
    search: bool = False, rate_probe: bool = False,
) -> RunCost:
    """Peak memory of each process kind, bytes moved and FLOPs of a run (see the module doc).
    inflight_layers: layers whose tasks may run beside the actors' next forward; 0: lockstep
    (``fit``), one layer's tasks at a time, none beside a forward.
    search: the smoothing searches a grid (``reconstruct.needs_gram``: it then reads the Grams).
    rate_probe: the driver times this CPU's matmuls (a local run's preview)."""
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
    base = {"base": BASE_PROCESS_BYTES}
    # A calibration actor in three phases: embedding its shard (the embedding read on the host:
    # raw bytes, then the tensor); collect's forward (the layer from the object store: its
    # stored bytes mapped and viewed in place, ``transport.SharedTensors``; built in the compute
    # dtype on the worker's device, the statistics accumulating there); collect's
    # return (the layer built is gone; the statistics are moved to the host and written into
    # the object store, the Grams as arrays: ``stats.split_parts``).
    received = {"layer_shared": shape.layer_bytes}
    # With layers overlapped, the statistics an actor returned for the layers still in flight lie
    # in the object store while it works on the next: pages it wrote, counted in its RSS
    # (shared; measured: 2 layers at hidden 2048, the actor's RSS 0.5 GiB above its forward's
    # terms, one layer's statistics; in lockstep they are freed first).
    behind = min(inflight_layers, shape.num_layers - 1)
    previous = {"stats_previous_layers": behind * stats64} if behind > 0 else {}
    start = {"embedding": 2 * shape.embedding_bytes}
    fwd_dev = {"layer_built": layer_compute, "stats_fp64": stats64, "stats_fp32_batch": stats32,
               "forward_batch": forward, "hidden_states": hidden}
    if on_gpu:
        ctx = {**base, "cuda_context": CUDA_CONTEXT_HOST_BYTES}
        calib = _phased("calibration", num_workers, {
            "start": {**ctx, **start}, "forward": {**ctx, **received, **previous},
            "return": {**ctx, **received, **previous, "stats_on_host": stats64, "stats_serialized": stats64}},
            {"cuda_context_gpu": CUDA_CONTEXT_GPU_BYTES, **fwd_dev}, BASE_PROCESS_BYTES + CUDA_CONTEXT_HOST_BYTES)
    else:
        calib = _phased("calibration", num_workers, {
            "start": {**base, **start, "hidden_states": hidden},
            "forward": {**base, **received, **previous, **fwd_dev},
            "return": {**base, **received, **previous, "stats_fp64": stats64, "stats_serialized": stats64,
                       "hidden_states": hidden}},
            idle=BASE_PROCESS_BYTES + hidden)

    # Smoothing reads the channel statistics only (a few K floats per group): the layer (its
    # stored bytes mapped and viewed in place), its folded copy (computed a block of rows at a
    # time: ``arch.FOLD_ROW_BLOCK``), and the folded weights it returns (written into the object
    # store one by one, each pickled in-band first). With a search grid it also sums every
    # group's Gram parts (``reconstruct.needs_gram``).
    largest_weight = max(lin.out_features * lin.in_features for lin in shape.linears) * shape.dtype_bytes
    fold_block = 2 * 8 * FOLD_ROW_BLOCK * max(max(lin.in_features, lin.out_features) for lin in shape.linears)
    smooth_terms = {**base, "layer_read": shape.layer_bytes,
                    "layer_folded": shape.layer_bytes, "fold_rows_float64": fold_block,
                    "weights_out": shape.layer_bytes, "weight_pickled": largest_weight}
    if search:
        smooth_terms |= {"grams": 8 * shape.gram_elements, "gram_part": 8 * max(k * k for _, k in shape.groups)}
    per_layer = max(1, inflight_layers)  # layers whose tasks run at once
    smooth = _phased("smooth", per_layer, {"smooth": smooth_terms})

    big = max(shape.linears, key=lambda lin: (lin.in_features ** 2 + RECONSTRUCT_NK_BUFFERS * lin.out_features
                                               * lin.in_features))
    N, K = big.out_features, big.in_features
    # A reconstruction task: the weight (pickled in-band: its own copy besides the stored bytes),
    # the one Gram buffer its group's parts are summed into (each part mapped from the object
    # store while it is added) and the (N, K) float64 buffers.
    rec_dev = {"gram": 8 * K * K, "nk_float64": RECONSTRUCT_NK_BUFFERS * 8 * N * K}
    rec_host = {**base, "weight": shape.dtype_bytes * N * K, "weight_shared": shape.dtype_bytes * N * K,
                "gram_part": 8 * K * K}
    rec_tasks = len(shape.linears) * per_layer
    if reconstruct_gpus > 0:
        rec = _phased("reconstruct", rec_tasks, {"reconstruct": {**rec_host, "cuda_context": CUDA_CONTEXT_HOST_BYTES}},
                      {"cuda_context_gpu": CUDA_CONTEXT_GPU_BYTES, **rec_dev, "weight_on_gpu": shape.dtype_bytes * N * K})
    else:
        rec = _phased("reconstruct", rec_tasks, {"reconstruct": {**rec_host, **rec_dev}})

    r_total = rank + num_outliers
    adapter_layer = sum((lin.out_features + lin.in_features) * r_total for lin in shape.linears) * shape.dtype_bytes
    codes = shape.layer_params  # int8 codes (w4a8) on disk: one byte per weight
    # The embedding and head stages are copied by the same kind of task, in a phase of its own
    # (``copy_stage_task``): read bytes, tensor, serialized shard.
    write_terms = {"codes": codes, "fp_tensors": shape.layer_bytes, "adapter_part": adapter_layer}
    copy_terms = {"stage_copy": 3 * shape.embedding_bytes}
    # The layer's read (``load_layer_task``, which asks for a writer's memory): the bytes read
    # (one range per shard), the tensors decoded from them and the finiteness check's block (a
    # float32 copy and its mask); then the tensors' bytes written into the object store (out of
    # band: ``transport.SharedTensors``).
    largest_tensor = max(lin.out_features * lin.in_features for lin in shape.linears)
    read_terms = {"layer_raw": shape.layer_bytes, "layer_tensors": shape.layer_bytes,
                  "finite_check": 5 * min(largest_tensor, FINITE_CHECK_BLOCK)}
    return_terms = {"layer_tensors": shape.layer_bytes, "layer_stored": shape.layer_bytes}
    writer = _phased("writer", per_layer, {"write": {**base, **write_terms}, "copy": {**base, **copy_terms},
                                                 "read_layer": {**base, **read_terms},
                                                 "return_layer": {**base, **return_terms}})
    # Finalize streams the merged adapter layer by layer (``export._write_adapter``): one stage's
    # part, read whole (the bytes read and the tensors), and the padded copy of its largest tensor.
    largest_adapter_tensor = max(max(lin.out_features, lin.in_features) for lin in shape.linears) * r_total
    fin_terms = {"adapter_part": 2 * adapter_layer, "padded_tensor": largest_adapter_tensor * shape.dtype_bytes}
    finalize = _phased("finalize", 1, {"finalize": {**base, **fin_terms}})
    driver_terms = {"tokenizer": TOKENIZER_BYTES_PER_ENTRY * shape.vocab,
                    "calibration_text": TOKENIZE_BYTES_PER_TEXT_BYTE * calib_text_bytes,
                    "tokens": 8 * num_samples * seq_len,
                    "rate_probe": rate_probe_bytes() if rate_probe else 0}
    driver = _phased("driver", 1, {"run": {**base, **driver_terms}})

    L = shape.num_layers
    tokens = num_samples * seq_len
    # Each layer is read once (``load_layer_task``; the workers and the smoothing share it
    # through the object store); each worker reads the embedding, the copy tasks read the
    # embedding and head stages.
    bytes_read = L * shape.layer_bytes + shape.embedding_bytes * num_workers + shape.embed_bytes
    bytes_written = L * (codes + adapter_layer) + shape.embed_bytes
    # Per layer in the object store: the layer as read, every worker's statistics, the folded
    # weights, the results.
    store = shape.layer_bytes + num_workers * stats64 + shape.layer_bytes + codes + adapter_layer
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


@dataclass(frozen=True)
class Fit:
    """How a run fits the cluster's memory: what Ray is asked to reserve per process kind, and
    whether the layers go in lockstep (the actors' ``collect`` of layer i + 1 waits until layer
    i's tasks are done, and an actor reserves only what it holds between calls)."""

    memory: dict[str, int]
    lockstep: bool
    note: str = ""


def fit(cost: RunCost, offered_total: float, offered_largest: float) -> Fit:
    """The concurrency a cluster whose nodes offer ``offered_total`` bytes of Ray memory in all
    (``offered_largest`` on its largest node) can hold, or ``ResourceError`` saying which process
    needs how much where there is how much.

    Ray holds an actor's ``memory`` for its whole life, and every layer needs its tasks (read,
    smooth, reconstruct, write): when what the actors hold plus the largest task exceeds the
    cluster's memory, that task is never scheduled and the run waits forever without an error
    (seen: stories260K, 2 workers, a 1.3 GiB Ray instance). The actors' peak is their forward,
    which their tasks never overlap in lockstep: then they reserve their idle footprint, and the
    run needs the larger of the two phases instead of their sum (a Llama-3-70B layer on this
    24 GB machine: 12.6 GiB for the forward, 10.9 GiB for the down_proj reconstruction). On one
    node this is exact; on several, necessary only (Ray may still fragment what is left)."""
    from aser.pipeline.resources import ResourceError

    kinds = cost.by_kind()
    memory = {p.kind: p.private_host_bytes for p in cost.processes if p.kind != "driver"}
    for kind, need in memory.items():
        if need > offered_largest:
            term, size = max(kinds[kind].terms.items(), key=lambda kv: kv[1])
            raise ResourceError(
                f"a {kind} process needs {need / 2**30:.1f} GiB of host memory (largest term: {term} "
                f"{size / 2**30:.1f} GiB); the largest Ray node offers {offered_largest / 2**30:.1f} GiB. "
                "Run `aser plan` to see the costs; more workers shard the calibration set")
    actors = kinds["calibration"]
    task = max((kinds[k] for k in TASK_KINDS), key=lambda p: p.private_host_bytes)
    held = actors.count * actors.private_host_bytes
    if held + task.private_host_bytes <= offered_total:
        return Fit(memory, False)
    idle = actors.count * actors.idle_host_bytes
    if held <= offered_total and idle + task.private_host_bytes <= offered_total:
        return Fit({**memory, "calibration": actors.idle_host_bytes}, True,
                   f"{actors.count} calibration worker(s) at {actors.private_host_bytes / 2**30:.1f} GiB and a "
                   f"{task.kind} task at {task.private_host_bytes / 2**30:.1f} GiB do not fit "
                   f"{offered_total / 2**30:.1f} GiB together: one layer at a time, the forward never beside "
                   "the layer's tasks")
    raise ResourceError(
        f"the run would wait forever: {actors.count} calibration worker(s) hold {actors.count} x "
        f"{actors.private_host_bytes / 2**30:.1f} GiB of host memory in their forward "
        f"({actors.idle_host_bytes / 2**30:.1f} GiB between layers) and a {task.kind} task needs "
        f"{task.private_host_bytes / 2**30:.1f} GiB beside them, where the cluster offers "
        f"{offered_total / 2**30:.1f} GiB in all. Lower --workers, or give Ray more memory (more nodes); "
        "`aser plan` shows each process's cost")
