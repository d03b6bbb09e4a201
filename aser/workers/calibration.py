"""The calibration worker: holds its shard of calibration hidden states and walks the layers.

A plain class (no Ray here; ``ray_actors`` makes it an actor). Per layer ``i`` the driver calls
``collect(i)`` (read layer i's tensors by byte range, build it with transformers' classes,
forward the shard with statistics hooks: partial per-group statistics out, FP outputs kept),
then ``advance(i)`` (``propagate = "fp"``: the FP outputs become the next layer's inputs) or
``propagate_quantized(i, ...)`` (the inputs go through the quantized layer instead). Each
boundary is persisted (``run_state.save_worker_state``) so that a restarted run resumes there.

Memory: the shard's inputs and outputs, one layer's tensors, and one batch's activations — a
function of layer size and calibration size, never of depth.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from aser.checkpoint import layers as layer_io
from aser.checkpoint import state as run_state
from aser.checkpoint import safetensors_io as sio
from aser.checkpoint.transport import SharedTensors, as_tensors
from aser.workers.arch import groups_for
from aser.workers.device import device_info, worker_device
from aser.workers.qlinear import install_quantized
from aser.workers.reconstruct import LinearResult, MethodConfig, SmoothedLayer
from aser.workers.stats import attach_stat_hooks, split_parts

# Calibration sequences forwarded at once. The same as ``simulate.apply_method``'s default, so a
# one-worker run groups the fp32 per-batch Gram sums exactly as the in-process reference does.
FORWARD_BATCH_SIZE = 8
EMBED_WEIGHT = "model.embed_tokens.weight"


def hf_config(config_dict: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config of ``config.json``'s contents, with the attention implementation
    fixed for standalone layers (``layers.layer_config``)."""
    d = dict(config_dict)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    return layer_io.layer_config(AutoConfig.for_model(model_type, **d))


def collect_outputs(config_dict: Mapping[str, Any]) -> int:
    """Number of objects ``CalibrationWorker.collect`` returns: channel statistics, step info,
    one Gram per group."""
    return 2 + len(groups_for(hf_config(config_dict)))


def expected_layer_tensors(config: PretrainedConfig, layer_idx: int) -> list[str]:
    """Relative names of the tensors decoder layer ``layer_idx`` holds (built on meta: free)."""
    return sorted(expected_layer_shapes(config, layer_idx))


def expected_layer_shapes(config: PretrainedConfig, layer_idx: int) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor of decoder layer ``layer_idx`` by relative name, as transformers'
    own layer class for ``config`` holds it (built on meta: free)."""
    return {n: tuple(t.shape) for n, t in layer_io.meta_layer(config, layer_idx).state_dict().items()}


def compute_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 for 16-bit tensors on a CPU, else the stored dtype (see CalibrationWorker)."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16):
        return torch.float32
    return stored


def read_layer(
    source: sio.SourceIndex, config: PretrainedConfig, layer_idx: int
) -> tuple[dict[str, torch.Tensor], int, str]:
    """Decoder layer ``layer_idx``'s tensors by relative name, read by byte range, the number
    of bytes read, and the content hash of those bytes (``safetensors_io.content_sha256``)."""
    prefix = layer_io.layer_prefix(layer_idx)
    names = [prefix + n for n in expected_layer_tensors(config, layer_idx)]
    digests: dict[str, str] = {}
    tensors = sio.read_tensors(source, names, digests)
    nbytes = sum(source.tensors[n].end - source.tensors[n].start for n in names)
    return {n[len(prefix):]: t for n, t in tensors.items()}, nbytes, sio.content_sha256(digests, prefix)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def process_info(role: str, device: torch.device | None = None) -> dict[str, Any]:
    """What the manifest records of a process: pid, role, peak RSS, and where it computed."""
    return {"pid": os.getpid(), "role": role, "peak_rss_bytes": peak_rss_bytes(),
            **device_info(device or torch.device("cpu"))}


@dataclass
class StepInfo:
    """What one call did, for the manifest: seconds per stage, bytes moved, the process's RSS."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    process: dict[str, Any] = field(default_factory=dict)
    source_sha256: str | None = None  # content hash of the layer when this call read it


class CalibrationWorker:
    """One shard of the calibration set, walked through the decoder layers.

    source_url: the checkpoint (already resolved, e.g. a local dir or s3:// URL);
    config_dict: its config.json; dest: the output URL (for the boundary states);
    rank: this worker's index (its states' names); num_threads: torch intra-op threads, fixed so
    that the same worker count gives the same bytes; use_gpu: compute on the GPU this process was
    given (``device.worker_device``: the CPU when there is none); kill_at_layer: a test hook, the
    process SIGKILLs itself halfway through ``collect`` of that layer.

    On a GPU the shard's hidden states, the layer and the statistics accumulators live on the
    device; what leaves the worker (statistics, saved states) is moved to the CPU first.
    """

    def __init__(
        self,
        source_url: str,
        config_dict: Mapping[str, Any],
        dest: str,
        rank: int,
        method: MethodConfig,
        num_threads: int = 1,
        kill_at_layer: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.device = worker_device(use_gpu)
        # The dtype the layers run in: the checkpoint's on a GPU; float32 on a CPU for 16-bit
        # checkpoints (a CPU without bf16 matrix units multiplies bf16 ~100x slower: 1.1 vs 110
        # GFLOP/s measured on this project's 2-core x86 machine), which is also more exact.
        self.compute_dtype: torch.dtype | None = None
        self.source = sio.open_source(source_url)
        self.config = hf_config(config_dict)
        self.rotary = layer_io.build_rotary(self.config, self.device)
        self.dest = dest
        self.rank = rank
        self.method = method
        self.kill_at_layer = kill_at_layer
        self.hidden: torch.Tensor | None = None  # (S_r, T, H): inputs of layer `next_layer`
        self.out: torch.Tensor | None = None  # FP outputs of the layer last collected
        self.next_layer = 0

    # ------------------------------------------------------------ start

    def embed(self, tokens: torch.Tensor) -> StepInfo:
        """tokens: (S_r, T) int64, this worker's calibration sequences -> layer 0's inputs."""
        t0 = time.perf_counter()
        info = self.source.tensors[EMBED_WEIGHT]
        weight = sio.read_tensors(self.source, [EMBED_WEIGHT])[EMBED_WEIGHT]
        self.compute_dtype = compute_dtype(weight.dtype, self.device)
        self.hidden = torch.nn.functional.embedding(tokens, weight).to(self.device, self.compute_dtype)
        del weight
        self.out = None
        self.next_layer = 0
        return StepInfo({"embed": time.perf_counter() - t0}, info.end - info.start, 0, self._process())

    def restore(self, next_layer: int) -> bool:
        """Load the inputs of ``next_layer`` saved at that boundary; False if there are none."""
        state = run_state.load_worker_state(self.dest, self.rank, next_layer)
        if state is None:
            return False
        self.next_layer, tensors = state
        self.compute_dtype = compute_dtype(tensors["hidden"].dtype, self.device)
        self.hidden = tensors["hidden"].to(self.device, self.compute_dtype)
        self.out = None
        return True

    # ------------------------------------------------------------ per layer

    def _load(
        self, layer_idx: int, tensors: SharedTensors | Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.nn.Module, int, str | None]:
        """Decoder layer ``layer_idx`` on this worker's device: from ``tensors`` (relative names;
        the run's one read of the layer, shared through the object store) or read from storage
        here (resume catch-up). Returns the layer, the bytes this call read from storage and
        their content hash (None when it read none)."""
        nbytes, sha = 0, None
        if tensors is None:
            tensors, nbytes, sha = read_layer(self.source, self.config, layer_idx)
        # Shared: views of the object store's bytes (read-only; the layer's parameters alias
        # them where the compute dtype is the stored one, and the forward only reads them).
        layer = layer_io.build_layer(self.config, layer_idx, as_tensors(tensors))
        del tensors
        return layer.to(self.device, self.compute_dtype), nbytes, sha

    def _process(self) -> dict[str, Any]:
        return process_info("calibration", self.device)

    def _check_at(self, layer_idx: int) -> torch.Tensor:
        if self.hidden is None or self.next_layer != layer_idx:
            raise RuntimeError(
                f"worker {self.rank} holds the inputs of layer {self.next_layer}, asked for {layer_idx}"
            )
        return self.hidden

    def _forward(self, layer: torch.nn.Module, layer_idx: int, hidden: torch.Tensor, kill: bool = False) -> torch.Tensor:
        outs = []
        starts = range(0, hidden.shape[0], FORWARD_BATCH_SIZE)
        kill_batch = min(1, len(starts) - 1) if kill else -1
        for b, start in enumerate(starts):
            if b == kill_batch:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-layer
            batch = hidden[start : start + FORWARD_BATCH_SIZE]
            inputs = layer_io.prepare_inputs(self.config, self.rotary, batch)
            outs.append(layer_io.run_layer(layer, self.config, layer_idx, batch, inputs))
        return torch.cat(outs) if outs else hidden.clone()

    @torch.no_grad()
    def collect(
        self, layer_idx: int, tensors: SharedTensors | Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Any, ...]:
        """Forward the shard through FP layer ``layer_idx`` with statistics hooks.

        tensors: the layer's tensors by relative name (``layer_tasks.load_layer_task``'s output,
        read once for all workers, viewed in the object store), or None to read them here. Returns this shard's partial
        statistics as ``stats.split_parts`` lays them out, the channel statistics per group
        first, then what the call did, then one fp64 Gram per group in ``groups_for`` order
        (``collect_outputs`` objects in all, for Ray's ``num_returns``); keeps the FP outputs for
        ``advance``."""
        hidden = self._check_at(layer_idx)
        t0 = time.perf_counter()
        layer, nbytes, _ = self._load(layer_idx, tensors)
        t1 = time.perf_counter()
        handles, accs = attach_stat_hooks(layer, groups_for(self.config))
        try:
            self.out = self._forward(layer, layer_idx, hidden, kill=self.kill_at_layer == layer_idx)
        finally:
            for h in handles:
                h.remove()
        del layer
        names = [g.name for g in groups_for(self.config)]
        channels, *grams = split_parts({name: acc.take().to("cpu") for name, acc in accs.items()}, names)
        del accs
        t2 = time.perf_counter()
        return channels, StepInfo({"load": t1 - t0, "forward": t2 - t1}, nbytes, 0, self._process()), *grams

    def _save(self) -> tuple[float, int]:
        assert self.hidden is not None
        t0 = time.perf_counter()
        run_state.save_worker_state(self.dest, self.rank, self.next_layer, {"hidden": self.hidden.cpu()})
        nbytes = self.hidden.numel() * self.hidden.element_size()
        return time.perf_counter() - t0, nbytes

    def advance(self, layer_idx: int, save: bool = True) -> StepInfo:
        """``propagate = "fp"``: layer ``layer_idx``'s FP outputs become the next inputs, saved
        at this boundary if ``save`` (the driver's ``SavePolicy`` decides)."""
        self._check_at(layer_idx)
        if self.out is None:
            raise RuntimeError(f"worker {self.rank}: advance({layer_idx}) before collect({layer_idx})")
        self.hidden, self.out = self.out, None
        self.next_layer = layer_idx + 1
        if not save:
            return StepInfo({}, 0, 0, self._process())
        save_s, nbytes = self._save()
        return StepInfo({"save_state": save_s}, 0, nbytes, self._process())

    @torch.no_grad()
    def forward_fp(self, layer_idx: int) -> StepInfo:
        """Forward through FP layer ``layer_idx`` without statistics (catching up on resume)."""
        hidden = self._check_at(layer_idx)
        t0 = time.perf_counter()
        layer, nbytes, sha = self._load(layer_idx)
        self.hidden = self._forward(layer, layer_idx, hidden)
        self.next_layer = layer_idx + 1
        return StepInfo({"forward": time.perf_counter() - t0}, nbytes, 0, self._process(), sha)

    @torch.no_grad()
    def propagate_quantized(
        self, layer_idx: int, meta: Any, linear_names: list[str], *results: LinearResult
    ) -> StepInfo:
        """``propagate = "quantized"``: forward the inputs through the quantized layer.

        meta: the smoothing task's ``LayerMeta`` (folded FP tensors without the quantized
        weights); results: one ``LinearResult`` per name in ``linear_names``.
        """
        hidden = self._check_at(layer_idx)
        t0 = time.perf_counter()
        by_name = dict(zip(linear_names, results, strict=True))
        tensors = dict(meta.tensors)
        for name, res in by_name.items():
            # A placeholder of the right shape: install_quantized replaces the linear anyway.
            tensors[f"{name}.weight"] = torch.zeros(res.q.shape, dtype=res.scale.dtype)
        layer = layer_io.build_layer(self.config, layer_idx, tensors)
        sm = SmoothedLayer(tensors=dict(meta.tensors), stats={}, outliers={}, choices={})
        install_quantized(layer, sm, by_name, self.method)
        layer = layer.to(self.device, self.compute_dtype)
        self.hidden = self._forward(layer, layer_idx, hidden)
        self.out = None
        self.next_layer = layer_idx + 1
        t1 = time.perf_counter()
        save_s, nbytes = self._save()
        return StepInfo({"forward_quantized": t1 - t0, "save_state": save_s}, 0, nbytes, self._process())

    def ping(self) -> dict[str, Any]:
        return self._process()
