"""A Llama-3-70B-sized decoder layer through `aser quantize`: memory and time per stage.

    python benchmarks/scale_layer.py --out scale-70b              # 2 layers of Llama-3-70B's shape
    python benchmarks/scale_layer.py --out scale-quick --hidden 1024 --intermediate 3584   # a quick one

Writes a synthetic checkpoint with Llama-3-70B's layer dimensions (hidden 8192, FFN 28672,
64 query / 8 KV heads, bf16 on disk; a 512-token vocabulary and stories260K's tokenizer so it
fits on a small disk), one shard per stage, generated tensor by tensor (the writer holds one
layer). Then runs the real pipeline on it (Ray workers, GPU workers when the machine has GPUs)
and prints one JSON object: wall time, the seconds of each stage summed over layers, every
process's peak host and GPU memory (from the manifest), and per linear the reconstruction's
Cholesky / SVD / quantize seconds. Random weights: the figures are about cost, not quality.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pipeline"))
from rss_sampler import sample_rss_anon  # noqa: E402  (the depth-leak test's sampler)

from aser.pipeline import driver  # noqa: E402
from aser.pipeline.config import CalibConfig, RunConfig, WorkersConfig
from aser.checkpoint.layers import layer_prefix, meta_layer
from aser.workers.calibration import expected_layer_tensors, hf_config
from aser.workers.reconstruct import MethodConfig

# Llama-3-70B (config.json of meta-llama/Meta-Llama-3-70B) except the vocabulary and depth.
LLAMA3_70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
VOCAB = 512  # stories260K's tokenizer


def _random(shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # RMSNorm weights
    # std 1/sqrt(fan_in): activations keep their scale through the layers.
    return (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)


def write_checkpoint(out: Path, tokenizer_dir: Path, layers: int, hidden: int, intermediate: int, heads: int,
                     kv_heads: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """The checkpoint, one safetensors shard per stage (embedding, each layer, head) plus index.
    Tensor names and shapes come from transformers' own Llama layer (built on meta)."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[1],
    )
    out.mkdir(parents=True)
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    hf = hf_config(config.to_dict())
    shapes = {n: t.shape for n, t in meta_layer(hf).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    stages: list[dict[str, torch.Size]] = [{"model.embed_tokens.weight": torch.Size((VOCAB, hidden))}]
    for i in range(layers):
        stages.append({layer_prefix(i) + n: shapes[n] for n in expected_layer_tensors(hf, i)})
    stages.append({"model.norm.weight": torch.Size((hidden,)), "lm_head.weight": torch.Size((VOCAB, hidden))})
    weight_map: dict[str, str] = {}
    total = 0
    for s, names in enumerate(stages):
        fname = f"model-{s + 1:05d}-of-{len(stages):05d}.safetensors"
        tensors = {n: _random(shape, dtype, gen) for n, shape in names.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


# A role recorded by a process -> the process kind whose memory it asks Ray for and the phases
# of that kind the role runs in (the layer's read asks for a writer's memory; a writer's copy of
# the embedding or head stage is a phase of its own). None: every phase.
ROLE_PHASES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "calibration": ("calibration", None), "smooth": ("smooth", None), "reconstruct": ("reconstruct", None),
    "write": ("writer", ("write",)), "copy": ("writer", ("copy",)), "read": ("writer", ("read_layer", "return_layer")),
    "finalize": ("finalize", None), "driver": ("driver", None)}


def _predicted_rss(plan: dict, roles: list[str]) -> int:
    """The model's peak RSS for a process that ran ``roles``: the largest of their phases'."""
    best = 0
    for role in roles:
        if role not in ROLE_PHASES or ROLE_PHASES[role][0] not in plan:
            continue
        kind, phases = ROLE_PHASES[role]
        entry = plan[kind]
        by_phase = entry.get("phases") or {}
        if phases is None or not by_phase:
            best = max(best, entry["peak_host_bytes"])
        else:
            best = max(best, *(by_phase.get(ph, 0) for ph in phases))
    return best


def predicted_vs_measured(summary: dict) -> list[dict]:
    """Per process of the run: its measured peak RSS (ru_maxrss: counts the object-store pages it
    touched, which accumulate over a run) against the memory model's peak RSS for the phases of
    the roles it ran, and its peak private memory (RssAnon, sampled) against its kinds' private
    bytes (the manifest's summary.plan; the private bytes are what the driver asked Ray for). A
    Ray worker process serves several roles over a run; its prediction is the largest of its
    roles'. The synthetic checkpoint is written by a child process of the driver's."""
    plan = summary.get("plan", {})
    rows = []
    for p in summary["processes"]:
        roles = p["role"].split("+")
        kinds = {ROLE_PHASES[r][0] for r in roles if r in ROLE_PHASES}
        predicted = _predicted_rss(plan, roles)
        private = max((plan[k].get("private_host_bytes", 0) for k in kinds if k in plan), default=0)
        anon = p.get("peak_rss_anon_bytes", 0)
        rows.append({"pid": p["pid"], "role": p["role"], "measured_rss_bytes": p["peak_rss_bytes"],
                     "measured_rss_anon_bytes": anon, "predicted_rss_bytes": predicted,
                     "predicted_private_bytes": private,
                     "ratio_rss": p["peak_rss_bytes"] / predicted if predicted else None,
                     "ratio_anon": anon / private if private and anon else None})
    return rows


def load_check(dest: str, out: dict) -> None:
    """DEST as its model card says to load it: transformers (the packed weights unpacked,
    ``run_compressed=False``) + PEFT (the adapter); one forward of 8 tokens. Run in a child
    process so its memory is its own; fills ``out``."""
    import resource

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        dest, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    model = PeftModel.from_pretrained(model, str(Path(dest) / "aser_adapter")).eval()
    t1 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.arange(1, 9)[None, :]).logits
    lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    out.update({"load_s": t1 - t0, "forward_s": time.perf_counter() - t1, "logits_finite": bool(torch.isfinite(logits).all()),
                "logits_shape": list(logits.shape), "lora_modules": lora,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def _load_check_child(dest: str, path: str) -> None:
    res: dict = {}
    load_check(dest, res)
    Path(path).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (checkpoint and DEST go under it)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="the shared test data (stories260K's tokenizer, TinyStories calibration text)")
    p.add_argument("--layers", type=int, default=2)
    for k, v in LLAMA3_70B.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--method", default="aser")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="default: from the cluster (one per GPU, else 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--reconstruct-cpus", type=int, default=1,
                   help="CPUs (torch threads) per reconstruction task")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and DEST")
    p.add_argument("--no-load-check", action="store_true", help="skip loading DEST in transformers + PEFT")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)

    work = Path(args.out)
    src, dest = work / "source", work / "dest"
    data = Path(args.data)
    t0 = time.perf_counter()
    if not src.exists():
        # In a child process: the driver's peak RSS is then the run's, not the generator's.
        proc = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(
            src, data / "stories260K", args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"writing the checkpoint failed (exit code {proc.exitcode})")
    write_s = time.perf_counter() - t0
    if dest.exists():
        shutil.rmtree(dest)
    cfg = RunConfig(
        source=str(src), dest=str(dest),
        method=MethodConfig(method=args.method, rank=args.rank),
        calib=CalibConfig(source=str(data / "tinystories" / "sample.txt"), num_samples=args.num_samples,
                          seq_len=args.seq_len),
        workers=WorkersConfig(num_workers=args.workers, num_cpus_per_worker=args.cpus_per_worker,
                              reconstruct_cpus=args.reconstruct_cpus),
    )
    with sample_rss_anon(os.getpid()) as anon:
        res = driver.run(cfg, show_progress=False)
    s = res.manifest.summary
    for p in s["processes"]:
        p["peak_rss_anon_bytes"] = anon.get(int(p["pid"]), 0)
    linears = {f"{i}.{name}": {k: m.get(k) for k in ("seconds", "gram_s", "svd_s", "cholesky_s", "quantize_s", "rank")}
               for i, rec in sorted(res.manifest.layers.items()) for name, m in rec.metrics.items()
               if not name.startswith("group:")}
    out = {
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")},
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "checkpoint_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
        "write_checkpoint_s": write_s,
        "wall_s": s["wall_s"],
        "stage_seconds_total": s["stage_seconds_total"],
        "resources": s.get("resources"),
        "lockstep": s.get("lockstep"),
        "plan": s.get("plan"),
        "processes": s["processes"],
        "workers": s["workers"],
        "linears": linears,
    }
    out["predicted_vs_measured"] = predicted_vs_measured(s)
    if not args.no_load_check:
        path = work / "load_check.json"
        proc = multiprocessing.get_context("spawn").Process(target=_load_check_child, args=(str(dest), str(path)))
        proc.start()
        proc.join()
        out["transformers_peft_load"] = json.loads(path.read_text()) if proc.exitcode == 0 else {
            "failed": f"exit code {proc.exitcode}"}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
