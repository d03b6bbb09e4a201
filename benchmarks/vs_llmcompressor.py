"""`aser quantize` against llm-compressor, side by side in one run, on the same model, the same
calibration token ids, the same thread count and the same machine; both write their checkpoint.

llm-compressor (SmoothQuant + GPTQ, W4A8 per-channel: ``benchmarks/llmcompressor_side.py``) runs
in its own virtual environment, created on first use (its transformers pin differs from ours).
Reported: wall time of each (the whole command, model loading and writing included), peak RSS
(llm-compressor: its one process; aser: the largest of its processes and the sum of all their
peaks), and the perplexity of each written checkpoint loaded the way a user loads it
(transformers, which applies compressed-tensors' W4A8 with its INT8 per-token activations on the
CPU; plus PEFT for aser's adapter) on the same test windows.

    python benchmarks/vs_llmcompressor.py                       # 64 x 512, 40 x 512 windows
    python benchmarks/vs_llmcompressor.py --source builtin:stories260k \
        --calib ../shared/data/tinystories/sample.txt --eval ../shared/data/tinystories/sample.txt \
        --num-samples 8 --seq-len 64 --eval-seq-len 64 --eval-windows 8 --rank 8   # smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline_smollm2 import data_relative, quantize_cmd, run_parser, run_timed  # noqa: E402

LLMCOMPRESSOR = "llmcompressor==0.14.0"
DEFAULT_VENV = Path.home() / ".cache" / "aser" / "bench" / "llmcompressor-0.14.0"


def ensure_venv(venv: Path) -> Path:
    """llm-compressor's interpreter; the environment is built once (same torch as ours)."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return py
    print(f"[bench] creating {venv} with {LLMCOMPRESSOR} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    for pkgs in ([torch_pin], [LLMCOMPRESSOR]):
        subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)
    return py


def main() -> int:
    p = run_parser(__doc__, 64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aser.pipeline import data, evaluate, manifest
    from aser.pipeline.sources import resolve_source

    lc_python = ensure_venv(a.venv)
    src = resolve_source(a.source)
    tok = AutoTokenizer.from_pretrained(src)
    # The token ids `aser quantize --calib` samples (same tokenizer, windows and seed), handed to
    # llm-compressor as they are; the manifest's hash below proves both saw the same ones.
    calib = data.calibration_windows(data.tokenize(tok, data.load_text(a.calib)), a.num_samples, a.seq_len, 0)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")}
    out: dict[str, Any] = {"source": a.source, "calibration": f"{a.num_samples} x {a.seq_len} of {data_relative(a.calib)}",
                           "threads": a.threads, "machine_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="aser-vs-lc-") as tmp:
        calib_pt, lc_out, ours = Path(tmp) / "calib.pt", Path(tmp) / "lc", Path(tmp) / "aser"
        torch.save(calib, calib_pt)
        lc_wall, lc_line = run_timed([str(lc_python), str(ROOT / "benchmarks" / "llmcompressor_side.py"), "--model", src,
                                      "--calib", str(calib_pt), "--out", str(lc_out), "--threads", str(a.threads)], env)
        lc = json.loads(lc_line)
        aser_wall, aser_line = run_timed(quantize_cmd(a, str(ours), "--cpus-per-worker", str(a.threads)), env)
        summary = json.loads(aser_line)["summary"]
        mf = manifest.load_manifest(str(ours))
        assert mf is not None and mf.calibration_sha256 == manifest.calibration_sha256(calib), "calibration differs"

        torch.set_num_threads(a.threads)
        windows = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), a.eval_seq_len, a.eval_windows)
        ppl = {"fp": evaluate.perplexity(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), windows)}
        ppl["llmcompressor"] = evaluate.perplexity(
            AutoModelForCausalLM.from_pretrained(str(lc_out), dtype=torch.float32).eval(), windows)
        model = AutoModelForCausalLM.from_pretrained(str(ours), dtype=torch.float32).eval()
        ppl["aser"] = evaluate.perplexity(PeftModel.from_pretrained(model, str(ours / "aser_adapter")).eval(), windows)

    rss = [int(pr["peak_rss_bytes"]) for pr in summary["processes"]]
    out.update({
        "llmcompressor": {"version": LLMCOMPRESSOR, "recipe": "SmoothQuant(0.8) + GPTQ, W4A8 per-channel",
                          "wall_s": lc_wall, **lc, "ppl": ppl["llmcompressor"]},
        "aser": {"method": "aser", "rank": a.rank, "wall_s": aser_wall, "run_s": summary["wall_s"],
                 "peak_rss_largest_bytes": max(rss), "peak_rss_sum_bytes": sum(rss),
                 "resources": summary["resources"], "stage_seconds_total": summary["stage_seconds_total"],
                 "ppl": ppl["aser"]},
        "ppl_fp": ppl["fp"],
        "eval": f"{windows.shape[0]} x {a.eval_seq_len} of {data_relative(a.eval)}",
        "wall_ratio_aser_over_llmcompressor": aser_wall / lc_wall,
    })
    if a.json:
        print(json.dumps(out))
        return 0
    gib = 2**30
    print(f"{a.source}, calibration {out['calibration']}, {a.threads} threads each:")
    print(f"  llm-compressor {lc_wall:7.1f} s (oneshot {lc['oneshot_s']:.1f} s)  peak RSS {lc['peak_rss_bytes'] / gib:.2f} GiB"
          f"  ppl {ppl['llmcompressor']:.3f}")
    print(f"  aser           {aser_wall:7.1f} s (run {summary['wall_s']:.1f} s)  peak RSS {max(rss) / gib:.2f} GiB largest,"
          f" {sum(rss) / gib:.2f} GiB summed  ppl {ppl['aser']:.3f}")
    print(f"  ratio aser / llm-compressor: {out['wall_ratio_aser_over_llmcompressor']:.2f}; fp ppl {ppl['fp']:.3f} "
          f"({out['eval']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
