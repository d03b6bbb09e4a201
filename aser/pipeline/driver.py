"""The driver loop of ``aser quantize``: plan, manifest, workers, layer by layer, finalize.

Per DESIGN.md: the driver holds metadata only (the plan, the manifest, object refs). Per layer
it asks every calibration actor for its partial statistics, hands their channel statistics
(unfetched) to a smoothing task that reduces them in rank order, spreads one reconstruction task
per linear over the cluster, each summing its group's Gram parts from the workers itself, and a
writer task packs and writes the layer; the manifest records it once the writer is done. With
``propagate = "fp"`` the actors move on to layer i+1 at once, so forward passes, SVDs and writes
of neighbouring layers overlap (at most ``MAX_INFLIGHT_LAYERS`` behind), unless the memory model
finds the forward and the layer's tasks cannot share the cluster's memory: then one layer at a
time (``memory.fit``'s lockstep); with ``"quantized"`` the actors' next inputs wait for layer
i's quantized linears.

Resume: the manifest fingerprints source, config and calibration; finished layers are skipped;
workers reload their hidden states at the first unfinished layer's boundary. A calibration actor
that dies mid-run is recovered the same way, with new actors (``MAX_RECOVERIES``). The
manifest's summary records every calibration actor started (rank, attempt, pid, Ray node) and
every recovery, so a run shows where its shards ran and what it survived.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

import aser
from aser.checkpoint import export, storage
from aser.checkpoint import state as run_state
from aser.pipeline import lease, manifest, verify
from aser.pipeline.calib_tokens import calibration_tokens
from aser.pipeline.config import RunConfig
from aser.pipeline.memory import Fit, ModelShape, RunCost, estimate, fit
from aser.pipeline.resources import ResourceError, Resources, resolve_resources
from aser.pipeline.plan import Plan, make_plan
from aser.pipeline.plan_cmd import preview
from aser.pipeline.save_policy import SavePolicy
from aser.workers import layer_tasks
from aser.workers.calibration import StepInfo, collect_outputs, process_info
from aser.workers.ray_actors import calibration_actor, remote_functions
from aser.workers.reconstruct import needs_gram

# Layers whose reconstruction/write may still run while the actors move on (propagate = fp).
# Bounds the object store and the driver's refs to a constant, whatever the depth.
MAX_INFLIGHT_LAYERS = 2
# New sets of calibration actors after one dies, before the run gives up.
MAX_RECOVERIES = 2
EMBED_INDEX = -1  # manifest index of the embedding stage; the head is num_layers


class PipelineError(ValueError):
    """The run cannot proceed; the message says why and what to do."""


class DestBusy(PipelineError):
    """Another live run holds DEST's lease (``lease.LeaseHeld``)."""


@dataclass
class RunResult:
    dest: str
    status: str  # "complete" | "already complete"
    manifest: manifest.Manifest
    wall_s: float


@dataclass
class _Pending:
    layer: int
    writer: Any
    collect_infos: list[Any]
    advance_infos: list[Any]


@dataclass
class _Ctx:
    config: RunConfig
    plan: Plan
    tokens: torch.Tensor
    mf: manifest.Manifest
    fns: dict[str, Any]
    on_layer: Callable[[int], None]
    kill_after: str | None
    kill_worker: tuple[int, int] | None
    resources: Resources
    memory: dict[str, int]  # host bytes per process kind, asked of Ray (pipeline.memory)
    lockstep: bool = False  # one layer at a time (memory.fit): no forward beside a layer's tasks
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Every calibration actor started (rank, attempt, pid, node) and every recovery: what the
    # manifest shows of where the shards ran and what the run survived.
    workers: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    # Each start of the workers: the first layer to do, the boundary restored (0: the
    # embedding) and the layers forwarded again from there.
    starts: list[dict[str, Any]] = field(default_factory=list)
    # Run-level seconds outside the layers: Ray start/connect, starting (or restoring) workers.
    overhead_s: dict[str, float] = field(default_factory=dict)
    saves: SavePolicy = field(default_factory=SavePolicy)
    held: lease.Lease | None = None

    @property
    def dest(self) -> str:
        return self.config.dest


def _note_processes(ctx: _Ctx, procs: list[dict[str, Any]]) -> None:
    # A Ray worker process serves several roles over a run (smooth, reconstruct, write).
    for p in procs:
        old = ctx.processes.setdefault(int(p["pid"]), {
            "pid": int(p["pid"]), "role": p["role"], "peak_rss_bytes": 0, "peak_gpu_bytes": 0,
            "devices": "", "gpus": ""})
        old["role"] = _joined(old["role"], p["role"])
        old["devices"] = _joined(old["devices"], p.get("device", "cpu"))
        if p.get("gpus"):
            old["gpus"] = _joined(old["gpus"], p["gpus"])
        if p.get("node_id"):
            old["node_id"] = p["node_id"]
        old["peak_rss_bytes"] = max(int(old["peak_rss_bytes"]), int(p["peak_rss_bytes"]))
        old["peak_gpu_bytes"] = max(int(old["peak_gpu_bytes"]), int(p.get("peak_gpu_bytes", 0)))


def _joined(old: str, new: str) -> str:
    """A set of names kept as one sorted "+"-joined string (what the manifest shows)."""
    return "+".join(sorted(set(filter(None, old.split("+"))) | {new}))


def _maybe_kill(ctx: _Ctx, point: str) -> None:
    if ctx.kill_after == point:
        # Test hook: die as a crash would, no cleanup, no flush.
        os.kill(os.getpid(), signal.SIGKILL)


def _save(ctx: _Ctx) -> None:
    if ctx.held is not None:
        ctx.held.check()  # a run whose lease was taken over stops before its next record
    manifest.save_manifest(ctx.dest, ctx.mf)


def _stage_name(ctx: _Ctx, index: int) -> str:
    return {EMBED_INDEX: "the embedding", ctx.plan.num_layers: "the head"}.get(index, f"layer {index}")


def _record_copy(ctx: _Ctx, index: int, written: layer_tasks.StageWritten) -> None:
    _note_processes(ctx, written.processes)
    ctx.mf.record_source_content(index, written.source_sha256, _stage_name(ctx, index))
    ctx.mf.record_layer(
        manifest.LayerRecord(
            index=index, status=manifest.LAYER_DONE, files=written.files, seconds=written.seconds,
            bytes_read=written.bytes_read, bytes_written=written.bytes_written,
        )
    )
    _save(ctx)


def _merge_seconds(infos: list[StepInfo], into: dict[str, float]) -> None:
    # Workers run in parallel: a stage takes as long as its slowest worker.
    for info in infos:
        for k, v in info.seconds.items():
            into[k] = max(into.get(k, 0.0), v)


def _record_layer(ctx: _Ctx, p: _Pending) -> None:
    written: layer_tasks.StageWritten = ray.get(p.writer)
    collect_infos: list[StepInfo] = ray.get(p.collect_infos)
    advance_infos: list[StepInfo] = ray.get(p.advance_infos)
    seconds: dict[str, float] = {}
    _merge_seconds(collect_infos, seconds)
    _merge_seconds(advance_infos, seconds)
    seconds.update(written.seconds)
    for info in collect_infos + advance_infos:
        _note_processes(ctx, [info.process])
    _note_processes(ctx, written.processes)
    ctx.saves.observe(seconds)
    ctx.mf.record_source_content(p.layer, written.source_sha256, _stage_name(ctx, p.layer))
    ctx.mf.record_layer(
        manifest.LayerRecord(
            index=p.layer,
            status=manifest.LAYER_DONE,
            files=written.files,
            metrics=written.metrics,
            seconds=seconds,
            bytes_read=written.bytes_read + sum(i.bytes_read for i in collect_infos),
            bytes_written=written.bytes_written + sum(i.bytes_written for i in advance_infos),
        )
    )
    _save(ctx)
    for rank in range(ctx.resources.num_workers):
        run_state.prune_worker_states(ctx.dest, rank, p.layer + 1)
    ctx.on_layer(p.layer)
    _maybe_kill(ctx, f"layer:{p.layer}")


def _note_start(ctx: _Ctx, start: dict[str, Any]) -> None:
    """Recorded at once (a later crash keeps it), and kept across resumed invocations."""
    ctx.starts.append(start)
    ctx.mf.summary["starts"] = ctx.starts
    _save(ctx)


def _start_workers(ctx: _Ctx, start: int, attempt: int) -> tuple[list[Any], int]:
    """New calibration actors holding the inputs of layer ``start``: restored from the newest
    boundary every worker saved, then forwarded to ``start`` (with ``propagate = "quantized"``
    the layers from that boundary are redone instead, as their inputs come from quantized layers).
    Returns (actors, the layer they are at)."""
    cfg = ctx.config
    res = ctx.resources
    Actor = calibration_actor(res.cpus_per_worker, res.gpus_per_worker, ctx.memory.get("calibration", 0))
    num_threads = max(1, int(res.cpus_per_worker))
    actors = []
    for rank in range(res.num_workers):
        kill = ctx.kill_worker[1] if ctx.kill_worker and ctx.kill_worker[0] == rank and attempt == 0 else None
        actors.append(Actor.remote(ctx.plan.source_url, ctx.plan.config_dict, ctx.dest, rank, cfg.method,
                                   num_threads, kill, res.gpus_per_worker > 0))
    places = ray.get([a.placement.remote() for a in actors])
    ctx.workers += [{"rank": rank, "attempt": attempt, **p} for rank, p in enumerate(places)]
    ranks = range(res.num_workers)
    # The newest boundary every worker saved (not every one is: save_policy).
    saved = run_state.latest_common_state(ctx.dest, ranks, start) if start > 0 else 0
    if saved > 0 and all(ray.get([a.restore.remote(saved) for a in actors])):
        at = saved
    else:
        shards = torch.tensor_split(ctx.tokens, res.num_workers)
        infos = ray.get([a.embed.remote(s) for a, s in zip(actors, shards, strict=True)])
        _note_processes(ctx, [i.process for i in infos])
        at = 0
    if cfg.propagate == "quantized":
        # Layer k's inputs come from the quantized layers before it: those layers are redone.
        _note_start(ctx, {"attempt": attempt, "start": start, "restored": at, "forwarded_again": 0})
        return actors, at
    for i in range(at, start):
        # Layers already done, read again: their bytes must be those the stages were made from.
        for info in ray.get([a.forward_fp.remote(i) for a in actors]):
            ctx.mf.record_source_content(i, info.source_sha256, _stage_name(ctx, i))
    _note_start(ctx, {"attempt": attempt, "start": start, "restored": at, "forwarded_again": start - at})
    return actors, start


def _settle(refs: list[Any]) -> None:
    """After a failure: cancel the tasks still running and fetch every result, discarding
    errors. An error object dropped unfetched makes Ray print its traceback later ("Unhandled
    error") under the one-line error the user is given."""
    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - an actor task or a finished one: nothing to cancel
            pass
    for ref in refs:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the failure being reported is the first one
            pass


def _run_layers(ctx: _Ctx, attempt: int) -> None:
    plan, cfg, fns = ctx.plan, ctx.config, ctx.fns
    L = plan.num_layers
    done = manifest.finished_layers(ctx.mf, ctx.dest)
    copies = []
    if EMBED_INDEX not in done:
        copies.append((EMBED_INDEX, fns["copy_stage"].remote(
            plan.source_url, ctx.dest, 0, L, list(plan.embed_names), cfg.shard_size_bytes,
            ctx.mf.source_content.get(EMBED_INDEX))))
    if L not in done:
        copies.append((L, fns["copy_stage"].remote(
            plan.source_url, ctx.dest, L + 1, L, list(plan.head_names), cfg.shard_size_bytes,
            ctx.mf.source_content.get(L))))
    todo = [i for i in range(L) if i not in done]
    if todo:
        unsettled: list[Any] = []
        try:
            t0 = time.perf_counter()
            actors, start = _start_workers(ctx, todo[0], attempt)
            ctx.overhead_s["start_workers"] = ctx.overhead_s.get("start_workers", 0.0) + time.perf_counter() - t0
            try:
                _layer_loop(ctx, actors, start, unsettled)
            finally:
                # Before settling: the actors' running tasks then fail at once, not waited for.
                for a in actors:
                    ray.kill(a)
        except Exception:
            _settle(unsettled + [ref for _, ref in copies])
            # Every task downstream of the failed one holds a copy of its error, and Ray prints
            # each, traceback and all, as its reference is freed ("Unhandled error"); the error
            # raised here is the one to report. Ray reads this variable when it prints.
            os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
            raise
    for index, ref in copies:
        _record_copy(ctx, index, ray.get(ref))
    _maybe_kill(ctx, "copies")


def submit_smooth(smooth: Any, n_out: int, config_dict: dict[str, Any], layer: int, method: Any,
                  loaded: Sequence[Any], collected: list[Any]) -> Any:
    """The smoothing task of a layer: the channel statistics (``collect``'s first outputs) and
    the Grams (its outputs from the third on) go in lists, fetched one at a time when needed; the
    ``collect`` infos (second outputs) go as top-level arguments so that Ray starts the task only
    once every worker's statistics exist (``ray_actors.smooth_streaming`` says what an earlier
    start cost)."""
    return smooth.options(num_returns=n_out).remote(
        config_dict, layer, method, *loaded, [c[0] for c in collected], [list(c[2:]) for c in collected],
        *[c[1] for c in collected])


def _layer_loop(ctx: _Ctx, actors: list[Any], start: int, unsettled: list[Any]) -> None:
    """Layers ``start``..L-1 through the pipeline. On an error, ``unsettled`` holds the results
    still in flight (for ``_settle``)."""
    pending: list[_Pending] = []
    try:
        _layer_loop_inner(ctx, actors, start, pending)
    except Exception:
        unsettled += [ref for p in pending for ref in (p.writer, *p.collect_infos, *p.advance_infos)]
        raise


def _layer_loop_inner(ctx: _Ctx, actors: list[Any], start: int, pending: list[_Pending]) -> None:
    plan, cfg, fns = ctx.plan, ctx.config, ctx.fns
    L = plan.num_layers
    fmt, gs = cfg.output_format, cfg.method.group_size
    n_out = layer_tasks.smooth_outputs(plan.config_dict)
    group_of = layer_tasks.linear_group_index(plan.config_dict)
    n_groups = n_out - 1 - len(group_of)
    n_collect = collect_outputs(plan.config_dict)
    linear_names = list(plan.linear_names)
    use_gpu = ctx.resources.reconstruct_gpus > 0
    for i in range(start, L):
        # The layer is read from storage once; its object goes to every worker and the smoothing.
        loaded = fns["load_layer"].options(num_returns=layer_tasks.LOAD_LAYER_OUTPUTS).remote(
            plan.source_url, plan.config_dict, i)
        tensors = loaded[0]
        collected = [a.collect.options(num_returns=n_collect).remote(i, tensors) for a in actors]
        outs = submit_smooth(fns["smooth"], n_out, plan.config_dict, i, cfg.method, loaded, collected)
        meta, payloads, weights = outs[0], outs[1 : 1 + n_groups], outs[1 + n_groups :]
        # Each reconstruction task sums its group's Gram parts itself: the Grams go from the
        # workers to the tasks that use them, through nothing else.
        results = [
            fns["reconstruct"].remote(w, payloads[g], cfg.method, use_gpu, ctx.resources.reconstruct_cpus,
                                      [c[2 + g] for c in collected])
            for w, g in zip(weights, group_of, strict=True)
        ]
        writer = fns["write_layer"].remote(ctx.dest, i, L, fmt, gs, cfg.shard_size_bytes, meta, *results,
                                           recorded_source_sha256=ctx.mf.source_content.get(i))
        if cfg.propagate == "fp":
            save = ctx.saves.due(i + 1)
            advanced = [a.advance.remote(i, save) for a in actors]
        else:
            advanced = [a.propagate_quantized.remote(i, meta, linear_names, *results) for a in actors]
        del outs, meta, payloads, weights, results, tensors, loaded
        pending.append(_Pending(i, writer, [c[1] for c in collected], advanced))
        # Record finished layers in order; wait only when too many are in flight (in lockstep:
        # any, so that the next forward never runs beside this layer's tasks).
        while pending and (
            len(pending) > (0 if ctx.lockstep else MAX_INFLIGHT_LAYERS)
            or not ray.wait([pending[0].writer], timeout=0)[1]
        ):
            _record_layer(ctx, pending[0])
            pending.pop(0)
    while pending:
        _record_layer(ctx, pending[0])
        pending.pop(0)


def plan_cost(plan: Plan, config: RunConfig, res: Resources, local: bool = False, lockstep: bool = False) -> RunCost:
    """The memory model of this run (the figures ``aser plan`` prints for it); local: the
    driver started its own Ray, and its preview timed this CPU's matmuls; lockstep: the
    layers go one at a time (``memory.fit``)."""
    shape = ModelShape.from_checkpoint(plan.config_dict, plan.index)
    text_bytes = 0
    if config.calib.source is not None:
        fs, path = storage.resolve(config.calib.source)
        text_bytes = int(fs.size(path) or 0)
    return estimate(shape, config.calib.num_samples, config.calib.seq_len, res.num_workers, res.gpus_per_worker,
                    res.reconstruct_gpus, config.method.rank, config.method.num_outliers,
                    0 if lockstep else MAX_INFLIGHT_LAYERS,
                    text_bytes, needs_gram(config.method), rate_probe=local)


def fit_memory(cost: RunCost, nodes: list[dict[str, Any]]) -> Fit:
    """Host bytes to ask of Ray per process kind, and whether the layers go in lockstep
    (``memory.fit``); refuses, before any work, a run that cannot fit. A cluster that reports no
    memory (none configured) gets no reservations."""
    alive = [float(n.get("Resources", {}).get("memory", 0.0)) for n in nodes if n.get("Alive")]
    if max(alive, default=0.0) <= 0:
        return Fit({p.kind: p.private_host_bytes for p in cost.processes if p.kind != "driver"}, False)
    return fit(cost, sum(alive), max(alive))


# A local Ray start that has not returned after this many seconds is stuck: seen in
# benchmarks/chaos.py when a Ray worker process was SIGKILLed while Ray started (the raylet
# logged that the process died before it registered; ``ray.init`` then waited for ever).
RAY_START_TIMEOUT_S = float(os.environ.get("ASER_RAY_START_TIMEOUT_S", "300"))


def _start_local_ray(held: lease.Lease | None, **kw: Any) -> None:
    """``ray.init(address="local", ...)``, watched by ``aser.pipeline.start_watchdog``, a process:
    if the start has not returned after ``RAY_START_TIMEOUT_S`` the run stops with a clear error,
    DEST's lease released, the driver and the Ray processes it started killed. Nothing of DEST is
    lost; the rerun resumes. (A thread cannot watch it: the stuck call holds the GIL.)"""
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "aser.pipeline.start_watchdog", str(os.getpid()), str(RAY_START_TIMEOUT_S)],
        stdin=subprocess.PIPE, text=True)
    assert watchdog.stdin is not None
    watchdog.stdin.write(json.dumps({} if held is None else {"dest": held.dest, "epoch": held.record.epoch}) + "\n")
    watchdog.stdin.flush()
    try:
        ray.init(address="local", **kw)
    finally:
        watchdog.stdin.close()
        watchdog.wait()


def _init_ray(config: RunConfig, held: lease.Lease | None = None) -> bool:
    """Connect to (or start) Ray; True if this call started it (and must shut it down).
    held: DEST's lease, released if a local start gets stuck (``_start_local_ray``)."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if config.ray_address:
        ray.init(address=config.ray_address, **kw)
    elif os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` Ray's own variable names the cluster the job belongs to.
        ray.init(**kw)
    else:
        # "local", not None: None would silently join whatever cluster another process on this
        # machine last started (Ray's /tmp/ray/ray_current_cluster), with its resources.
        wc = config.workers
        cores = os.cpu_count() or 1
        # The workers inherit this process's environment. OpenMP threads that wait passively
        # (sleep instead of spinning) leave the cores to whichever process has work: the
        # calibration forward's threads share them with a reconstruction task. SmolLM2-135M,
        # 32 x 512 tokens, 2 cores: 108 and 110 s against 118 s spinning (GNU OpenMP's default).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if wc.num_cpus_per_worker is None:
            # A reconstruction task's CPUs more than the cores: by default the workers take the
            # cores (resources.default_cpus_per_worker leaves the task's share) and one task at
            # a time runs beside them, on the CPU time the forward leaves.
            _start_local_ray(held, num_cpus=cores + wc.reconstruct_cpus, **kw)
        else:
            # Actors hold their CPUs for the whole run; a task needs its CPUs besides.
            need = math.ceil((wc.num_workers or 1) * wc.num_cpus_per_worker) + wc.reconstruct_cpus
            _start_local_ray(held, num_cpus=max(cores, need), **kw)
    return True


def _forget_damaged(mf: manifest.Manifest, dest: str, when: str) -> list[int]:
    """Drop the records of stages whose files no longer match them (so they are redone); returns
    their indices. Reads every file the records name once (``verify.check_files``)."""
    damaged = verify.damaged_layers(mf, dest)
    for idx, findings in sorted(damaged.items()):
        del mf.layers[idx]
        f = findings[0]
        print(f"[aser] {when}: {f.name} is {f.problem} ({f.detail}); its stage will be redone", file=sys.stderr)
    return sorted(damaged)


def refuse_damaged(mf: manifest.Manifest, dest: str) -> None:
    """Before the index is written: every stage file must still be what was written. A stage that
    is not is dropped from the manifest (saved) and the run stops; the rerun redoes it."""
    damaged = _forget_damaged(mf, dest, "before finalize")
    if damaged:
        manifest.save_manifest(dest, mf)
        raise PipelineError(
            f"refusing to write the index: the files of {len(damaged)} stage(s) changed in "
            f"{storage.redact(dest)} after they were written (above); rerun the same command to redo them"
        )


def _unwrap(e: BaseException) -> BaseException:
    """The user's exception inside (possibly nested) task errors: a failed collect fails the
    smoothing task that needs its statistics, which fails the writer."""
    while isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e


def _existing(config: RunConfig, plan: Plan, calib_sha: str) -> manifest.Manifest | None:
    """DEST's manifest, checked against this run (source fingerprint, config, calibration)."""
    try:
        existing = manifest.load_manifest(config.dest)
    except OSError as e:
        raise PipelineError(f"cannot read DEST {storage.redact(config.dest)}: {e}") from e
    if existing is not None:
        # Workers are compared once resolved against the cluster (below); a finished DEST is
        # left alone without starting Ray.
        manifest.check_compatible(existing, config, plan.fingerprint, calib_sha, ignore=frozenset({"workers"}))
    if manifest.is_finished(config.dest) and existing is None:
        raise PipelineError(
            f"{storage.redact(config.dest)} already holds a checkpoint not written by aser "
            f"(no {manifest.MANIFEST_NAME}); choose another DEST"
        )
    return existing


def run(
    config: RunConfig,
    *,
    show_progress: bool = True,
    kill_after: str | None = None,
    kill_worker: tuple[int, int] | None = None,
    wait: bool = False,
    lease_ttl_s: float = lease.DEFAULT_TTL_S,
) -> RunResult:
    """Quantize ``config.source`` into ``config.dest``.

    DEST is written under its lease (``pipeline.lease``): another live run's lease makes this
    one stop with DestBusy before it writes anything, or with ``wait`` wait for it.
    kill_after / kill_worker: test hooks (crash the driver after a point: ``layer:I``,
    ``copies``, ``finalize``, ``indexed``: finalize done, before the manifest's last save; or
    worker RANK mid-way through layer I), never set in production.
    """
    t0 = time.perf_counter()
    plan = make_plan(config)
    local = not (ray.is_initialized() or config.ray_address or os.environ.get("RAY_ADDRESS"))
    print(preview(config, ModelShape.from_checkpoint(plan.config_dict, plan.index), config.calib.source is None, local),
          file=sys.stderr)
    size = sum(s.size_bytes for s in plan.index.shards.values())
    tokens, calib_desc = calibration_tokens(config, plan.source_url, size)
    calib_sha = manifest.calibration_sha256(tokens)

    def already_complete(existing: manifest.Manifest) -> RunResult:
        print(f"[aser] {storage.redact(config.dest)} is already complete; nothing to do", file=sys.stderr)
        return RunResult(config.dest, "already complete", existing, time.perf_counter() - t0)

    existing = _existing(config, plan, calib_sha)
    if existing is not None and manifest.is_complete(existing, config.dest) and not run_state.has_state(config.dest):
        return already_complete(existing)
    try:
        held = lease.acquire(config.dest, ttl_s=lease_ttl_s, wait=wait)
    except lease.LeaseHeld as e:
        raise DestBusy(str(e)) from e
    except OSError as e:  # the lease is the run's first write to DEST
        raise PipelineError(f"DEST {storage.redact(config.dest)} is not writable: {e}") from e
    try:
        # Another run may have written DEST (or finished it) while this one waited.
        existing = _existing(config, plan, calib_sha)
        if existing is not None and manifest.is_complete(existing, config.dest):
            # Killed after its last manifest save, before the workers' states were removed.
            run_state.clear_state(config.dest)
            return already_complete(existing)
        return _run_held(config, plan, tokens, calib_desc, calib_sha, existing, local, t0, held,
                         show_progress=show_progress, kill_after=kill_after, kill_worker=kill_worker)
    except lease.LeaseLost as e:
        raise PipelineError(str(e)) from e
    finally:
        held.release()


def _run_held(
    config: RunConfig, plan: Plan, tokens: torch.Tensor, calib_desc: str, calib_sha: str,
    existing: manifest.Manifest | None, local: bool, t0: float, held: lease.Lease, *,
    show_progress: bool, kill_after: str | None, kill_worker: tuple[int, int] | None,
) -> RunResult:
    """``run`` once DEST's lease is held: Ray, the layers, finalize."""
    if existing is not None:
        # A stage file deleted or changed behind the run's back is redone, not trusted.
        _forget_damaged(existing, config.dest, "resuming")
    t_ray = time.perf_counter()
    if local and show_progress:
        print("[aser] starting a local Ray instance", file=sys.stderr)
    owned = _init_ray(config, held)
    ray_init_s = time.perf_counter() - t_ray
    try:  # until the layers start: a Ray this call started is shut down on any error
        node_cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
        resources = resolve_resources(config.workers, ray.cluster_resources(), node_cpus)
        # The resolved worker count and devices decide the bytes (calibration sharding, GPU or
        # CPU numerics): they are what the manifest records and what a resume must match.
        config = dataclasses.replace(config, workers=resources.workers_config())
        if existing is not None:
            manifest.check_compatible(existing, config, plan.fingerprint, calib_sha)
        cost = plan_cost(plan, config, resources, local)
        fitted = fit_memory(cost, ray.nodes())
        if fitted.lockstep:
            print(f"[aser] memory: {fitted.note}", file=sys.stderr)
            cost = plan_cost(plan, config, resources, local, lockstep=True)  # what the manifest records
        memory = fitted.memory
        mf = existing or manifest.new_manifest(config, plan.fingerprint, calib_sha)
        mf.summary["calibration"] = calib_desc
        try:
            manifest.save_manifest(config.dest, mf)
        except OSError as e:
            raise PipelineError(f"DEST {storage.redact(config.dest)} is not writable: {e}") from e
    except BaseException:
        if owned:
            ray.shutdown()
        raise

    from tqdm import tqdm

    done0 = len([i for i in manifest.finished_layers(mf, config.dest) if 0 <= i < plan.num_layers])
    if existing is not None:
        print(f"[aser] resuming {storage.redact(config.dest)}: {done0} of {plan.num_layers} layers already done",
              file=sys.stderr)
    bar = tqdm(total=plan.num_layers, initial=done0, desc="aser quantize", unit="layer",
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    ctx = _Ctx(config, plan, tokens, mf, remote_functions(resources.reconstruct_gpus, memory, resources.reconstruct_cpus),
               lambda _i: bar.update(1), kill_after, kill_worker, resources, memory, fitted.lockstep)
    mf.summary["plan"] = {p.kind: {"count": p.count, "peak_host_bytes": p.peak_host_bytes,
                                   "private_host_bytes": p.private_host_bytes, "peak_gpu_bytes": p.peak_gpu_bytes,
                                   "phase": p.phase, "phases": p.phases} for p in cost.processes}
    mf.summary["lockstep"] = fitted.lockstep
    ctx.overhead_s["ray_init"] = ray_init_s
    ctx.starts = list(mf.summary.get("starts", []))
    ctx.saves = SavePolicy(every=1 if config.propagate == "quantized" else config.save_state_every)
    ctx.held = held
    try:
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                _run_layers(ctx, attempt)
                break
            except (RayActorError, ObjectLostError) as e:
                # A dead worker, or a result lost with its node (a node removed mid-run: seen in
                # benchmarks/chaos.py as OBJECT_UNRECONSTRUCTABLE): both mean new workers from
                # the last finished layer.
                if getattr(e, "actor_init_failed", False):
                    # An error in the worker's constructor (unreadable source, no credentials)
                    # is not a crash: new workers would fail the same way.
                    raise PipelineError(f"calibration worker could not start: {e}") from e
                if attempt == MAX_RECOVERIES:
                    raise PipelineError(
                        f"calibration workers died {attempt + 1} times; giving up ({e}). Rerun the "
                        "same command to resume from the last finished layer"
                    ) from e
                ctx.recoveries.append({"attempt": attempt, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"\n[aser] a calibration worker or an intermediate result was lost ({type(e).__name__}); "
                      "resuming at the last finished layer with new workers", file=sys.stderr)
        bar.close()
        _maybe_kill(ctx, "finalize")
        parts = sorted({name for rec in mf.layers.values() for name in rec.files
                        if name.startswith(export.ADAPTER_PARTS_DIR)})
        refuse_damaged(mf, config.dest)
        held.check()
        t_fin = time.perf_counter()
        if show_progress:
            print(f"[aser] finalize: merging {len(parts)} adapter parts, writing config and index", file=sys.stderr)
        card = {"aser_version": aser.__version__, "method": config.method.to_dict(),
                "calibration": {"num_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
                                "tokens_sha256": calib_sha}}
        fin, proc = ray.get(ctx.fns["finalize"].remote(
            config.dest, plan.source_url, plan.num_layers, config.output_format, config.method.group_size, parts,
            card))
        _maybe_kill(ctx, "indexed")
        _note_processes(ctx, [proc])
    except RayTaskError as e:
        cause = _unwrap(e)
        if isinstance(cause, (ValueError, OSError)):
            raise PipelineError(f"{type(cause).__name__}: {cause}") from cause
        raise
    finally:
        bar.close()
        if owned:
            ray.shutdown()
    _note_processes(ctx, [process_info("driver")])
    wall = time.perf_counter() - t0
    mf.summary.update(_summary(ctx, wall, time.perf_counter() - t_fin, fin))
    mf.final_files = dict(fin.files)
    # Counted on the headers of what was written, so the figure cannot drift from what ships.
    mf.summary["extra"] = manifest.shipped_extra_cost(config.dest).to_dict()
    _save(ctx)
    run_state.clear_state(config.dest)
    return RunResult(config.dest, "complete", mf, wall)


def _summary(ctx: _Ctx, wall_s: float, finalize_s: float, fin: export.FinalizeResult) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    for rec in ctx.mf.layers.values():
        for k, v in rec.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    seconds["finalize"] = finalize_s
    seconds.update(ctx.overhead_s)
    procs = sorted(ctx.processes.values(), key=lambda p: (p["role"], p["pid"]))
    return {
        "wall_s": wall_s,
        "stage_seconds_total": seconds,
        "bytes_read": sum(r.bytes_read for r in ctx.mf.layers.values()),
        "bytes_written": sum(r.bytes_written for r in ctx.mf.layers.values()),
        "num_tensors": fin.num_tensors,
        "total_size_bytes": fin.total_size_bytes,
        "adapter": fin.adapter,
        "num_workers": ctx.resources.num_workers,
        "resources": ctx.resources.to_dict(),
        "processes": procs,
        "workers": ctx.workers,
        "recoveries": ctx.recoveries,
        "starts": ctx.starts,
        # Content hash of every tensor the run read (stage by stage): which bytes this DEST was
        # made from, whatever the store's versions said.
        "source_sha256": ctx.mf.source_sha256(),
    }


def summary_table(mf: manifest.Manifest) -> str:
    """Per layer: mean relative output error before/after, ranks, seconds per stage, MB."""
    stages = ("load", "forward", "smooth", "reconstruct", "write")
    head = f"{'layer':>5} {'err before':>10} {'err after':>10} {'rank':>5} " + " ".join(f"{s:>11}" for s in stages)
    lines = [head + f" {'MB read':>8} {'MB written':>10}"]
    for idx in sorted(mf.layers):
        rec = mf.layers[idx]
        lin = [m for k, m in rec.metrics.items() if not k.startswith("group:")]
        if not lin:
            continue
        before = sum(m["rel_error_before"] for m in lin) / len(lin)
        after = sum(m["rel_error_after"] for m in lin) / len(lin)
        ranks = sorted({int(m["rank"]) for m in lin})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        secs = " ".join(f"{rec.seconds.get(s, 0.0):>10.2f}s" for s in stages)
        lines.append(f"{idx:>5} {before:>10.4f} {after:>10.4f} {rank:>5} {secs} "
                     f"{rec.bytes_read / 1e6:>8.2f} {rec.bytes_written / 1e6:>10.2f}")
    s = mf.summary
    if s:
        lines.append(f"wall {s.get('wall_s', 0.0):.1f} s; read {s.get('bytes_read', 0) / 1e6:.1f} MB, "
                     f"wrote {s.get('bytes_written', 0) / 1e6:.1f} MB")
        totals = s.get("stage_seconds_total", {})
        if totals:
            # Summed over layers: stages of different layers overlap, so they add up to more
            # than the wall time; each worker-side stage is the slowest worker's.
            lines.append("seconds per stage, summed over layers: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))
        for p in s.get("processes", []):
            lines.append(f"  peak RSS {p['role']:<12} pid {p['pid']:<8} {p['peak_rss_bytes'] / 2**20:8.1f} MiB")
    return "\n".join(lines)
