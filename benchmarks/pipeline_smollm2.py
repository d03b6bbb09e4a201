"""`aser quantize` on SmolLM2-135M with local Ray: wall time against reading the checkpoint once
plus one FP forward over the same calibration tokens, time per stage, peak RSS per process, and
the perplexity of the written checkpoint loaded through transformers + PEFT.

Full size (the issue's setting; minutes on a CPU):
    python benchmarks/pipeline_smollm2.py
Smoke run (seconds):
    python benchmarks/pipeline_smollm2.py --source builtin:stories260k \
        --calib ../shared/data/tinystories/sample.txt --eval ../shared/data/tinystories/sample.txt \
        --num-samples 8 --seq-len 64 --rank 8 --eval-seq-len 64 --eval-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ASER_TEST_DATA", ROOT.parent / "shared" / "data"))


def data_relative(path: str) -> str:
    """A path under the data folder as relative to it (results must not name this machine's
    folders); any other path or URL unchanged."""
    try:
        return Path(path).resolve().relative_to(DATA.resolve()).as_posix()
    except ValueError:
        return path


def baseline_seconds(source_url: str, tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Read every tensor of the checkpoint once (by byte range, as the pipeline does), then one
    FP forward of the model over the calibration tokens."""
    from transformers import AutoModelForCausalLM

    from aser.checkpoint import safetensors_io as sio

    t0 = time.perf_counter()
    src = sio.open_source(source_url)
    state = sio.read_tensors(src, src.tensors)
    read_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(source_url, dtype=torch.float32).eval()
    del state
    t1 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size], use_cache=False)
    return {"read_s": read_s, "forward_s": time.perf_counter() - t1}


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``cmd``: its wall seconds and the last line of its stdout (where a ``--json`` command
    prints its result). A failure ends the benchmark with the command's stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:4])} ...")
    return wall, (proc.stdout.strip().splitlines() or [""])[-1]


def quantize_cmd(a: argparse.Namespace, dest: str, *extra: str) -> list[str]:
    """``aser quantize`` of ``a.source`` to DEST with the shared calibration flags and ``a.rank``,
    printing its JSON result, in ``a.format`` (run_parser's, w4a8-int unless given), plus ``extra`` flags (a
    later ``--format`` among them wins)."""
    return [sys.executable, "-m", "aser.pipeline.quantize_cmd", "quantize", a.source, dest, "--calib", a.calib,
            "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--rank", str(a.rank), "--json",
            "--no-progress", "--format", a.format, *extra]


def variants_setup(p: argparse.ArgumentParser, out_name: str) -> tuple[argparse.Namespace, torch.Tensor, dict]:
    """For a benchmark that quantizes several variants and evaluates each: ``--rank``,
    ``--eval-seq-len``, ``--eval-windows``, ``--out`` added to ``p`` and parsed; the evaluation
    windows (the source's tokenizer); the result's header (source, calibration, windows)."""
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out_name))
    a = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from aser.pipeline import data
    from aser.pipeline.sources import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(a.source))
    windows = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), a.eval_seq_len, a.eval_windows)
    header = {"source": a.source, "method": "aser", "rank": a.rank,
              "calibration": f"{a.num_samples} x {a.seq_len} of {data_relative(a.calib)}",
              "eval": f"{windows.shape[0]} x {a.eval_seq_len} of {data_relative(a.eval)}"}
    return a, windows, header


def run_parser(doc: str | None, num_samples: int) -> argparse.ArgumentParser:
    """The flags every SmolLM2 pipeline benchmark shares: source, calibration and evaluation text."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="builtin:smollm2-135m")
    p.add_argument("--calib", default=str(DATA / "wikitext2" / "valid.tokenized.txt"))
    p.add_argument("--eval", default=str(DATA / "wikitext2" / "test.raw.txt"))
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--seq-len", type=int, default=512)
    # Not aser's default (w4a16-pack): these benchmarks compare with llm-compressor's and
    # transformers' W4A8 int-quantized arithmetic, and the README's figures were measured on it.
    p.add_argument("--format", default="w4a8-int", choices=("w4a8-int", "w4a16-pack"))
    return p


def main() -> int:
    p = run_parser(__doc__, 128)
    p.add_argument("--method", default="aser")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=10)
    p.add_argument("--dest", default=None, help="default: a temporary directory")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aser.pipeline import data, evaluate
    from aser.pipeline.sources import resolve_source

    src = resolve_source(a.source)
    tok = AutoTokenizer.from_pretrained(src)
    calib = data.calibration_windows(data.tokenize(tok, data.load_text(a.calib)), a.num_samples, a.seq_len, 0)
    base = baseline_seconds(src, calib, 8)

    with tempfile.TemporaryDirectory(prefix="aser-bench-") as tmp:
        dest = a.dest or str(Path(tmp) / "out")
        wall, line = run_timed(quantize_cmd(a, dest, "--method", a.method, "--workers", str(a.workers)))
        summary = json.loads(line)["summary"]

        windows = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), a.eval_seq_len, a.eval_windows)
        fp_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ppl_fp = evaluate.perplexity(fp_model, windows)
        del fp_model
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
        ppl_base = evaluate.perplexity(model, windows)
        model = PeftModel.from_pretrained(model, str(Path(dest) / "aser_adapter")).eval()
        ppl = evaluate.perplexity(model, windows)

    baseline = base["read_s"] + base["forward_s"]
    out = {
        "source": a.source, "method": a.method, "rank": a.rank, "workers": a.workers,
        "calibration": f"{a.num_samples} x {a.seq_len}", "quantize_wall_s": wall,
        "quantize_run_s": summary["wall_s"], "baseline_read_s": base["read_s"],
        "baseline_forward_s": base["forward_s"], "ratio": wall / baseline,
        "stage_seconds_total": summary["stage_seconds_total"], "processes": summary["processes"],
        "ppl_fp": ppl_fp, "ppl_quantized_base": ppl_base, "ppl_quantized_with_adapter": ppl,
        "eval": f"{windows.shape[0]} x {a.eval_seq_len} of {data_relative(a.eval)}",
    }
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"aser quantize {a.source} ({a.method}, r={a.rank}, {a.workers} worker(s), calib {out['calibration']}):")
    print(f"  wall {wall:.1f} s (the run itself {summary['wall_s']:.1f} s) vs read once {base['read_s']:.2f} s "
          f"+ FP forward {base['forward_s']:.2f} s = {baseline:.2f} s: ratio {out['ratio']:.1f}x")
    print("  seconds per stage (summed over layers; workers' stages are the slowest worker's):")
    for k, v in sorted(summary["stage_seconds_total"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:<18} {v:8.2f}")
    print("  peak RSS per process:")
    for pr in summary["processes"]:
        print(f"    {pr['role']:<40} pid {pr['pid']:<8} {pr['peak_rss_bytes'] / 2**20:8.1f} MiB")
    print(f"  perplexity ({out['eval']}): fp {ppl_fp:.3f}, quantized base {ppl_base:.3f}, "
          f"+ adapter {ppl:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
