"""``aser plan SOURCE``: what a run will cost, from config.json (and the safetensors headers
when they are there), before any tensor is read or any machine started.

The figures come from ``memory.estimate`` and ``resources.resolve_resources``, the same code the
driver uses to size and place a real run; the time estimate divides the counted FLOPs and bytes
by a device profile's rates times a stated efficiency, and prints those assumptions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from aser.checkpoint import safetensors_io as sio
from aser.checkpoint import storage
from aser.pipeline.config import WorkersConfig
from aser.pipeline.memory import RATE_PROBE_SIZES, ModelShape, RunCost, estimate, fit
from aser.pipeline.resources import ResourceError, resolve_resources


@dataclass(frozen=True)
class DeviceProfile:
    """Per node. Rates are dense peaks (datasheet, or measured for ``cpu``) in FLOP/s."""

    name: str
    gpus_per_node: int
    gpu_memory_bytes: int
    host_memory_bytes: int
    cpus_per_node: int
    bf16_flops: float  # per device (GPU, or the whole CPU)
    fp32_flops: float  # the statistics' Grams (fp32, no TF32)
    fp64_flops: float  # Cholesky, whitened products, error metrics
    storage_read_bytes_s: float  # per node, from object storage
    source: str


EFFICIENCY = 0.5  # share of the peak a well-shaped GEMM reaches in practice; stated, not measured
# NVIDIA H100 / H200 SXM datasheet peaks (dense): bf16 989 TFLOP/s, fp32 67 TFLOP/s, fp64 tensor
# core 67 TFLOP/s; an 8-GPU node (DGX/HGX) with 2 TiB host memory and 224 CPUs; object storage
# read at 2 GB/s per node (an assumption: S3 with many parallel ranged GETs on a 100 Gb/s NIC).
_GPU = dict(gpus_per_node=8, host_memory_bytes=2 * 2**40, cpus_per_node=224, bf16_flops=989e12,
            fp32_flops=67e12, fp64_flops=67e12, storage_read_bytes_s=2e9, source="NVIDIA datasheet peaks")
PROFILES = {
    "h100": DeviceProfile("h100", gpu_memory_bytes=80 * 10**9, **_GPU),  # type: ignore[arg-type]
    "h200": DeviceProfile("h200", gpu_memory_bytes=141 * 10**9, **_GPU),  # type: ignore[arg-type]
}


def _matmul_rate(dtype: Any, n: int, reps: int = 3) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


RAY_OBJECT_STORE_SHARE = 0.3  # Ray's default object store: 30 % of the memory available at start


def _available_memory() -> int:
    """The kernel's estimate of memory available to a new process (MemAvailable: free memory
    plus the page cache it can reclaim), as Ray reads it; total memory where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_profile() -> DeviceProfile:
    """This machine, its matmul rates measured now (about a second)."""
    import torch

    # What a local Ray started now offers its tasks and actors: the memory available, less the
    # object store's default 30 % of it (here: 16.3 GiB of memory beside a 7.0 GiB store, of
    # 23.6 GiB available).
    mem = int(_available_memory() * (1 - RAY_OBJECT_STORE_SHARE))
    return DeviceProfile(
        "cpu", gpus_per_node=0, gpu_memory_bytes=0, host_memory_bytes=mem, cpus_per_node=os.cpu_count() or 1,
        bf16_flops=_matmul_rate(torch.bfloat16, RATE_PROBE_SIZES[torch.bfloat16]),
        fp32_flops=_matmul_rate(torch.float32, RATE_PROBE_SIZES[torch.float32]),
        fp64_flops=_matmul_rate(torch.float64, RATE_PROBE_SIZES[torch.float64]), storage_read_bytes_s=1e9,
        source=f"measured on this machine (torch matmul, {torch.get_num_threads()} threads); local disk 1 GB/s assumed",
    )


class PlanCmdError(ValueError):
    pass


def read_shape(source: str) -> ModelShape:
    """The model's shape from SOURCE's config.json; the dtype from the safetensors headers if
    the checkpoint is there (a directory with config.json alone plans a model not downloaded)."""
    from aser.pipeline import sources

    url = sources.resolve_source(source)  # SourceError names a directory without config.json
    config_url = storage.join(url, "config.json")
    try:
        config = json.loads(storage.read_text(config_url))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanCmdError(f"{storage.redact(config_url)} is not valid JSON: {e}") from e
    try:
        index = sio.open_source(url)
    except (OSError, ValueError):
        index = None  # config-only directory: the dtype comes from config.json
    return ModelShape.from_checkpoint(config, index)


def make_report(shape: ModelShape, profile: DeviceProfile, nodes: int, workers: int | None,
                gpus_per_worker: float | None, reconstruct_gpus: float | None, num_samples: int, seq_len: int,
                rank: int, num_outliers: int) -> dict[str, Any]:
    cluster = {"GPU": float(profile.gpus_per_node * nodes), "CPU": float(profile.cpus_per_node * nodes)}
    res = resolve_resources(WorkersConfig(num_workers=workers, num_gpus_per_worker=gpus_per_worker,
                                          reconstruct_gpus=reconstruct_gpus), cluster,
                            [float(profile.cpus_per_node)] * nodes)
    cost = estimate(shape, num_samples, seq_len, res.num_workers, res.gpus_per_worker, res.reconstruct_gpus,
                    rank, num_outliers)
    concurrency = _concurrency(cost, profile, nodes)
    fits = _fits(cost, res.gpus_per_worker, res.reconstruct_gpus, profile, nodes)
    if concurrency["lockstep"]:  # the run the driver will make: one layer at a time
        cost = estimate(shape, num_samples, seq_len, res.num_workers, res.gpus_per_worker, res.reconstruct_gpus,
                        rank, num_outliers, inflight_layers=0)
    return {
        "model": {"num_layers": shape.num_layers, "hidden": shape.hidden, "intermediate": shape.intermediate,
                  "dtype_bytes": shape.dtype_bytes, "layer_bytes": shape.layer_bytes},
        "resources": {**res.to_dict(), "nodes": nodes, "profile": profile.name},
        "processes": [{"kind": p.kind, "count": p.count, "peak_host_bytes": p.peak_host_bytes,
                       "private_host_bytes": p.private_host_bytes, "peak_gpu_bytes": p.peak_gpu_bytes,
                       "phase": p.phase, "terms": p.terms} for p in cost.processes],
        "bytes_read": cost.bytes_read,
        "bytes_written": cost.bytes_written,
        "object_store_bytes_per_layer": cost.object_store_bytes_per_layer,
        "flops": cost.flops,
        "seconds_estimate": _seconds(cost, shape.dtype_bytes, res.num_workers, res.gpus_per_worker,
                                     res.reconstruct_gpus, profile, nodes),
        "fits": fits,
        "concurrency": concurrency,
        "assumptions": {"efficiency": EFFICIENCY, "profile": profile.__dict__,
                        "overlap": "none assumed: the stages' times are added (an upper bound; the pipeline "
                                   "overlaps reading, forward, reconstruction and writing)"},
    }


def _seconds(cost: RunCost, dtype_bytes: int, workers: int, gpw: float, recon_gpus: float, p: DeviceProfile,
             nodes: int) -> dict[str, float]:
    f = cost.flops
    # On a GPU the layer runs in its stored dtype; on a CPU 16-bit layers run in float32
    # (``calibration.compute_dtype``).
    forward_rate = p.bf16_flops if dtype_bytes == 2 and gpw > 0 else p.fp32_flops
    work = f["calibration_forward"] / forward_rate + f["statistics"] / p.fp32_flops
    if gpw > 0:  # each worker on its own GPU
        calib = work / (workers * EFFICIENCY)
    else:  # workers share the node's CPU
        calib = work / EFFICIENCY
    if recon_gpus > 0:
        devices = p.gpus_per_node * nodes  # every GPU runs reconstructions (fractions share a GPU's rate)
        recon = (f["cholesky"] + f["reconstruct_products"]) / (p.fp64_flops * devices * EFFICIENCY)
    else:
        recon = (f["cholesky"] + f["reconstruct_products"]) / (p.fp64_flops * nodes * EFFICIENCY)
    read = cost.bytes_read / (p.storage_read_bytes_s * nodes)
    return {"calibration": calib, "reconstruct": recon, "read": read, "total": calib + recon + read}


def _concurrency(cost: RunCost, p: DeviceProfile, nodes: int) -> dict[str, Any]:
    """What the driver will choose (``memory.fit``): layers overlapped, or one at a time."""
    try:
        f = fit(cost, p.host_memory_bytes * nodes, p.host_memory_bytes)
    except ResourceError:
        return {"lockstep": None, "note": "does not fit (see fits)"}
    return {"lockstep": f.lockstep, "note": f.note or "layers overlap: the next forward runs beside a layer's tasks"}


def _fits(cost: RunCost, gpw: float, recon_gpus: float, p: DeviceProfile, nodes: int) -> list[str]:
    """What does not fit a node of the profile, each as one line naming the process kind."""
    kinds = cost.by_kind()
    problems = []
    try:
        fit(cost, p.host_memory_bytes * nodes, p.host_memory_bytes)  # what the driver will check
    except ResourceError as e:
        problems.append(f"host: {e}")
    if gpw > 0:
        per_gpu = kinds["calibration"].peak_gpu_bytes
        if recon_gpus > 0:
            per_gpu += math.floor((1 - gpw) / recon_gpus) * kinds["reconstruct"].peak_gpu_bytes
        if per_gpu > p.gpu_memory_bytes:
            problems.append(f"GPU: a calibration worker and the reconstruction tasks sharing its GPU need "
                            f"{per_gpu / 1e9:.1f} GB, a GPU has {p.gpu_memory_bytes / 1e9:.0f} GB")
    return problems


def _human(report: dict[str, Any]) -> str:
    gib = 2**30
    m, r = report["model"], report["resources"]
    lines = [f"model: {m['num_layers']} layers, hidden {m['hidden']}, FFN {m['intermediate']}, "
             f"{m['layer_bytes'] / gib:.2f} GiB per layer",
             f"resources ({r['profile']} x {r['nodes']} node(s)): {r['num_workers']} calibration worker(s), "
             f"{r['gpus_per_worker']:g} GPU each; reconstruction tasks {r['reconstruct_gpus']:g} GPU each",
             f"{'process':<12} {'count':>5} {'peak RSS GiB':>13} {'own GiB':>8} {'peak GPU GiB':>13}  peak phase"]
    for p in report["processes"]:
        lines.append(f"{p['kind']:<12} {p['count']:>5} {p['peak_host_bytes'] / gib:>13.2f} "
                     f"{p['private_host_bytes'] / gib:>8.2f} {p['peak_gpu_bytes'] / gib:>13.2f}  {p['phase']}")
    s = report["seconds_estimate"]
    lines += [f"read {report['bytes_read'] / 1e9:.1f} GB, write {report['bytes_written'] / 1e9:.1f} GB, "
              f"object store {report['object_store_bytes_per_layer'] / 1e9:.2f} GB per layer",
              "FLOPs: " + ", ".join(f"{k} {v:.3g}" for k, v in report["flops"].items()),
              f"time estimate: {s['total'] / 60:.1f} min (calibration {s['calibration']:.0f} s, reconstruction "
              f"{s['reconstruct']:.0f} s, reading {s['read']:.0f} s; efficiency {EFFICIENCY}, no overlap assumed; "
              f"rates: {report['assumptions']['profile']['source']})"]
    lines.append(f"concurrency: {report['concurrency']['note']}")
    if report["fits"]:
        lines += ["DOES NOT FIT:"] + [f"  {p}" for p in report["fits"]]
    return "\n".join(lines)


# Sampling calibration text from the model runs one token at a time for a batch of sequences:
# small matrix products that reach a fraction of the measured matmul rate (SmolLM2-135M,
# batches of 64 sequences on 2 cores: 0.34 of it, the first run's 8128 tokens in 49 s).
SAMPLING_EFFICIENCY = 0.3


def preview(config: Any, shape: ModelShape, self_generated: bool, local: bool) -> str:
    """What ``aser quantize`` prints before it starts: the work, and for a run on this machine
    (``local``: a Ray it starts itself) how long ``aser plan``'s model expects it to take."""
    c, m = config.calib, config.method
    lines = [f"[aser] {storage.redact(config.source)} -> {storage.redact(config.dest)}: {shape.num_layers} layers "
             f"of {shape.layer_bytes / 2**20:.0f} MiB, {m.method} rank {m.rank}, calibration {c.num_samples} x "
             f"{c.seq_len} tokens ({'sampled from the model' if self_generated else storage.redact(c.source or '')})"]
    if not local:
        lines.append("[aser] on a Ray cluster: `aser plan SOURCE --device-profile h100|h200` estimates its time")
        return "\n".join(lines)
    profile = cpu_profile()
    wc = config.workers
    report = make_report(shape, profile, 1, wc.num_workers, wc.num_gpus_per_worker, wc.reconstruct_gpus,
                         c.num_samples, c.seq_len, m.rank, m.num_outliers)
    s = report["seconds_estimate"]
    total = s["total"]
    parts = [f"calibration {s['calibration']:.0f} s", f"reconstruction {s['reconstruct']:.0f} s"]
    if self_generated:
        params = shape.num_layers * shape.layer_params + shape.vocab * shape.hidden
        sampling = c.num_samples * c.seq_len * 2 * params / (profile.fp32_flops * SAMPLING_EFFICIENCY)
        total += sampling
        parts.insert(0, f"sampling {sampling:.0f} s")
    lines.append(f"[aser] estimated {total / 60:.1f} min on this machine ({', '.join(parts)}; `aser plan`'s model "
                 f"at this CPU's measured matmul rate)")
    return "\n".join(lines)


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="what a run will cost (memory per process, bytes, FLOPs, time), "
                                           "from config.json alone")
    p.add_argument("source", help="checkpoint directory or URL (config.json alone is enough)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--reconstruct-gpus", type=float, default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--num-outliers", type=int, default=8)
    p.add_argument("--device-profile", choices=("cpu", *PROFILES), default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(a: argparse.Namespace) -> int:
    shape = read_shape(a.source)
    profile = cpu_profile() if a.device_profile == "cpu" else PROFILES[a.device_profile]
    report = make_report(shape, profile, a.nodes, a.workers, a.gpus_per_worker, a.reconstruct_gpus,
                         a.num_samples, a.seq_len, a.rank, a.num_outliers)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(_human(report))
    if report["fits"]:
        print("aser: error: the run does not fit: " + "; ".join(report["fits"]), file=sys.stderr)
        return 3
    return 0
