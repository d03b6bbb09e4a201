"""The stateless per-layer work of a run, as pure functions (``ray_actors`` makes them tasks).

- ``smooth_task``: reduce the workers' partial channel statistics (in rank order, fp64), ASER
  step 1 (smoothing + folds) on the layer's tensors; returns the layer's folded FP tensors and,
  as separate objects so each reconstruction task fetches only its own, one payload per group
  (channel statistics of the smoothed input, the smoothing scale, outlier channels) and one
  weight per linear. The Grams do not pass through it (unless a search needs them);
- ``reconstruct_task``: sums its group's Gram parts (in rank order, fp64) into one buffer,
  scales it to the smoothed input, and runs steps 2–3 for one linear;
- ``write_layer_task``: pack a layer to the output format and write its shard and adapter part;
- ``copy_stage_task``: the embedding and head stages, copied from the source;
- ``finalize_task``: ``export.finalize`` (config, adapter, copied files, the index last).

All are idempotent: same inputs, same outputs, and writes are atomic under deterministic names,
so a retried task is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aser.checkpoint import export
from aser.checkpoint import layers as layer_io
from aser.checkpoint import safetensors_io as sio
from aser.checkpoint.formats import OutputFormat
from aser.checkpoint.state import FileRecord
from aser.checkpoint.transport import SharedTensors, as_tensors
from aser.workers.arch import groups_for
from aser.workers.calibration import hf_config, process_info, read_layer
from aser.workers.device import worker_device
from aser.workers.reconstruct import LinearResult, MethodConfig, needs_gram, reconstruct_linear, smooth_layer
from aser.workers.stats import ChannelStats, GroupStats, reduce_grams_into, reduce_parts

# Intra-op threads of a reconstruction task: fixed, so the SVD's bytes do not depend on which
# machine (how many cores) ran it.
TASK_THREADS = 1


@dataclass
class LayerMeta:
    """A layer after smoothing: FP tensors (relative names) with the folds applied and the
    quantized linears' weights removed (they travel separately); choices per group."""

    tensors: dict[str, torch.Tensor]
    choices: dict[str, dict[str, float]]
    linear_names: list[str]
    bytes_read: int
    seconds: dict[str, float]
    process: dict[str, Any]
    source_sha256: str  # content hash of the layer's source bytes (``safetensors_io.content_sha256``)
    read_process: dict[str, Any] | None = None  # the process that read the layer (``load_layer_task``)


@dataclass
class GroupPayload:
    """What a group's reconstruction tasks share besides the Gram parts: the channel statistics
    of the smoothed input, the smoothing scale m (None: unsmoothed) and the outlier channels."""

    channels: ChannelStats
    scale: torch.Tensor | None
    outliers: torch.Tensor | None


@dataclass
class StageWritten:
    """What a writer did: files (name relative to DEST -> record), metrics per linear."""

    stage: int
    files: dict[str, FileRecord]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    processes: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str | None = None  # content hash of the source bytes the stage was made from


def smooth_outputs(config_dict: Mapping[str, Any]) -> int:
    """Number of objects ``smooth_task`` returns: meta, one per group, one per linear."""
    groups = groups_for(config_dict)
    return 1 + len(groups) + sum(len(g.linears) for g in groups)


LOAD_LAYER_OUTPUTS = 5


def load_layer_task(source_url: str, config_dict: Mapping[str, Any], layer_idx: int) -> tuple[Any, ...]:
    """Read decoder layer ``layer_idx`` from storage once for the whole run: returns (tensors
    by relative name as ``transport.SharedTensors``, bytes read, seconds, content hash of the
    bytes read, this process) as five objects (``LOAD_LAYER_OUTPUTS``). The driver hands the
    tensors' object to every calibration worker and to the smoothing task; Ray keeps one copy per
    node in its object store and moves it between nodes once per node, so a layer costs one
    storage read however many workers there are, and each reader views the store's bytes instead
    of deserializing a copy of its own."""
    torch.set_num_threads(TASK_THREADS)
    t0 = time.perf_counter()
    tensors, nbytes, sha = read_layer(sio.open_source(source_url), hf_config(config_dict), layer_idx)
    return SharedTensors.of(tensors), nbytes, time.perf_counter() - t0, sha, process_info("read")


def smooth_task(
    config_dict: Mapping[str, Any],
    layer_idx: int,
    method: MethodConfig,
    tensors: SharedTensors | Mapping[str, torch.Tensor],
    nbytes: int,
    read_s: float,
    source_sha256: str,
    read_process: dict[str, Any] | None,
    channel_parts: Iterable[Mapping[str, ChannelStats]],
    gram_parts: Callable[[int], Iterable[Any]] | None = None,
) -> tuple[Any, ...]:
    """Reduce ``channel_parts`` (one per worker, in rank order; consumed lazily, so a generator
    that fetches each part when asked keeps one at a time) and smooth layer ``layer_idx``
    (``tensors, nbytes, read_s, source_sha256, read_process``: ``load_layer_task``'s outputs). Returns (LayerMeta,
    GroupPayload per group, W (N, K) per linear) in ``groups_for`` order.

    gram_parts(g): group g's Gram parts, in rank order; read only when the smoothing searches
    (``reconstruct.needs_gram``)."""
    torch.set_num_threads(TASK_THREADS)
    t0 = time.perf_counter()
    config = hf_config(config_dict)
    groups = groups_for(config)
    channels = reduce_parts(channel_parts)
    if set(channels) != {g.name for g in groups}:
        raise ValueError(f"layer {layer_idx}: statistics for groups {sorted(channels)}, expected "
                         f"{sorted(g.name for g in groups)}")
    stats: dict[str, Any] = dict(channels)
    if needs_gram(method):
        if gram_parts is None:
            raise ValueError("the smoothing search needs the Grams: pass gram_parts")
        for gi, g in enumerate(groups):
            K = channels[g.name].absmax.shape[0]
            G = reduce_grams_into(torch.empty(K, K, dtype=torch.float64), gram_parts(gi))
            stats[g.name] = GroupStats.of(G, channels[g.name])
    t1 = time.perf_counter()
    t2 = time.perf_counter()
    sm = smooth_layer(as_tensors(tensors), stats, method, config)
    t3 = time.perf_counter()
    linears = [lin for g in groups for lin in g.linears]
    quantized = {f"{lin}.weight" for lin in linears}
    meta = LayerMeta(
        tensors={k: v for k, v in sm.tensors.items() if k not in quantized},
        choices=sm.choices,
        linear_names=linears,
        bytes_read=nbytes,
        seconds={"reduce": t1 - t0, "read_layer": read_s, "smooth": t3 - t2},
        process=process_info("smooth"),
        source_sha256=source_sha256,
        read_process=read_process,
    )
    payloads = [GroupPayload(_channels(sm.stats[g.name]), sm.scales.get(g.name), sm.outliers[g.name])
                for g in groups]
    weights = [sm.tensors[f"{lin}.weight"] for lin in linears]
    return (meta, *payloads, *weights)


def _channels(st: GroupStats | ChannelStats) -> ChannelStats:
    return st.channels if isinstance(st, GroupStats) else st


def linear_group_index(config_dict: Mapping[str, Any]) -> list[int]:
    """For each linear in ``groups_for`` order, the index of its group."""
    return [gi for gi, g in enumerate(groups_for(config_dict)) for _ in g.linears]


def reconstruct_task(
    W: torch.Tensor, payload: GroupPayload, method: MethodConfig, gram_parts: Callable[[], Iterable[Any]],
    use_gpu: bool = False, threads: int = TASK_THREADS,
) -> LinearResult:
    """Steps 2–3 for one smoothed linear, W: (N, K) in the checkpoint's dtype.

    gram_parts(): the group's Gram parts (the workers', in rank order; consumed lazily). They are
    summed and scaled into the one Gram-sized buffer the task holds, which the whitening then
    factors in place; if the factorization must be retried with more damping, the buffer is
    filled again from the parts (``reconstruct_linear``'s ``refill_gram``).

    use_gpu: run on the GPU this task was given (the CPU when there is none). The result is on
    the CPU either way; where it ran is in ``res.process``. threads: torch's CPU threads, the
    CPUs the task was given (``workers.reconstruct_cpus``: part of the run's config, so that a
    resumed run splits its sums the same way and writes the same bytes).
    """
    torch.set_num_threads(threads)
    device = worker_device(use_gpu)
    t0 = time.perf_counter()
    outliers = None if payload.outliers is None else payload.outliers.to(device)

    def fill(buf: torch.Tensor) -> torch.Tensor:
        return reduce_grams_into(buf, gram_parts(), payload.scale)

    K = W.shape[1]
    G = fill(torch.empty(K, K, dtype=torch.float64, device=device))
    t1 = time.perf_counter()
    stats = GroupStats.of(G, payload.channels.to(device))
    del G
    res = reconstruct_linear(W.to(device), stats, outliers, method, scale_dtype=W.dtype, refill_gram=fill)
    del stats
    res = res.to("cpu")
    res.metrics["gram_s"] = t1 - t0
    res.metrics["task_s"] = time.perf_counter() - t0
    res.process = process_info("reconstruct", device)
    if device.type == "cuda":
        # The worker process lives on (ray_actors.TASK_MAX_CALLS): hand the blocks torch cached
        # back to the GPU, which the calibration actor and other tasks share.
        torch.cuda.empty_cache()
    return res


def write_layer_task(
    dest: str,
    layer_idx: int,
    num_layers: int,
    fmt: OutputFormat,
    group_size: int | None,
    shard_size_bytes: int,
    meta: LayerMeta,
    *results: LinearResult,
    recorded_source_sha256: str | None = None,
) -> StageWritten:
    """Pack layer ``layer_idx`` (its results in ``meta.linear_names`` order) and write it.

    recorded_source_sha256: the content hash of the layer's source bytes when an earlier
    invocation of the run read them (the manifest's ``source_content``): if the bytes read this
    time differ, nothing is written (``safetensors_io.SourceChanged``)."""
    sio.check_content(f"layer {layer_idx}", recorded_source_sha256, meta.source_sha256)
    t0 = time.perf_counter()
    by_name = dict(zip(meta.linear_names, results, strict=True))
    prefix = layer_io.layer_prefix(layer_idx)
    fp = dict(meta.tensors)
    for name, res in by_name.items():
        fp[f"{name}.weight"] = res.q  # dropped by layer_tensors: the codes replace it
    base, adapter = export.layer_tensors(prefix, fp, by_name, fmt, group_size)
    files = export.write_stage(dest, 1 + layer_idx, num_layers, base, adapter, shard_size_bytes)
    t1 = time.perf_counter()
    metrics: dict[str, dict[str, float]] = {}
    processes = [meta.process] + ([meta.read_process] if meta.read_process else [])
    recon_s = 0.0
    for name, res in by_name.items():
        m = res.metrics
        metrics[name] = {
            "rel_error_before": float(m["err_before"]),
            "rel_error_after": float(m["err_after"]),
            "rank": int(m["rank"]),
            "seconds": float(m.get("task_s", 0.0)),
            "gram_s": float(m.get("gram_s", 0.0)),
            "svd_s": float(m.get("svd_s", 0.0)),
            "cholesky_s": float(m.get("cholesky_s", 0.0)),
            "quantize_s": float(m.get("quantize_s", 0.0)),
        }
        recon_s += float(m.get("task_s", 0.0))
        processes.append({**res.process, "linear": name})
    for gname, choice in meta.choices.items():
        metrics[f"group:{gname}"] = {k: float(v) for k, v in choice.items()}
    processes.append(process_info("write"))
    return StageWritten(
        stage=1 + layer_idx,
        files=files,
        metrics=metrics,
        bytes_read=meta.bytes_read,
        bytes_written=sum(f.size_bytes for f in files.values()),
        seconds={**meta.seconds, "reconstruct": recon_s, "write": t1 - t0},
        processes=processes,
        source_sha256=meta.source_sha256,
    )


def copy_stage_task(
    source_url: str, dest: str, stage: int, num_layers: int, names: Sequence[str], shard_size_bytes: int,
    recorded_source_sha256: str | None = None,
) -> StageWritten:
    """The embedding (stage 0) or head (stage L + 1) tensors, copied from the source as they are
    (``recorded_source_sha256``: as in ``write_layer_task``)."""
    t0 = time.perf_counter()
    source = sio.open_source(source_url)
    digests: dict[str, str] = {}
    tensors = sio.read_tensors(source, names, digests)
    sha = sio.content_sha256(digests)
    sio.check_content("the embedding" if stage == 0 else "the head", recorded_source_sha256, sha)
    nbytes = sum(source.tensors[n].end - source.tensors[n].start for n in names)
    files = export.write_stage(dest, stage, num_layers, tensors, None, shard_size_bytes)
    return StageWritten(
        stage=stage,
        files=files,
        bytes_read=nbytes,
        bytes_written=sum(f.size_bytes for f in files.values()),
        seconds={"copy": time.perf_counter() - t0},
        processes=[process_info("copy")],
        source_sha256=sha,
    )


def finalize_task(
    dest: str, source_url: str, num_layers: int, fmt: OutputFormat, group_size: int | None,
    adapter_parts: Sequence[str], card: Mapping[str, Any] | None = None,
) -> tuple[export.FinalizeResult, dict[str, Any]]:
    """``export.finalize`` on a worker: merging the adapter parts needs their tensors, which the
    driver (metadata only) never holds."""
    res = export.finalize(dest, source_url, num_layers, fmt, group_size, adapter_parts, card)
    return res, process_info("finalize")
