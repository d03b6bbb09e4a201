"""The README's first command as a new user meets it: a fresh clone, a fresh virtual environment,
an empty aser cache (the GGUF -> safetensors conversion included), the command exactly as the
README prints it; then what the first run's smaller self-sampled calibration costs in perplexity
against the full default (128 x 512 sampled from the model), both evaluated on the same windows.

    python benchmarks/first_run.py --json > benchmarks/results/first_run.json

Not a fresh machine: pip's wheel cache and this machine's package mirror make the installs
faster than a first download would be.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from pipeline_smollm2 import DATA, data_relative  # noqa: E402


def readme_first_command() -> str:
    """The first command line of the README's first bash block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README has no bash block"
    return next(line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#"))


def timed(cmd: str, cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"failed ({rc}): {cmd}")
    return time.perf_counter() - t0


def perplexity_of(dest: Path, windows: torch.Tensor) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aser.pipeline import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32).eval()
    return evaluate.perplexity(PeftModel.from_pretrained(model, str(dest / "aser_adapter")).eval(), windows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", default=str(DATA / "wikitext2" / "test.raw.txt"))
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--skip-full", action="store_true", help="only the first run, not the 128 x 512 comparison")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from transformers import AutoTokenizer

    from aser.pipeline import data

    command = readme_first_command()
    out: dict[str, object] = {"command": command, "machine_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="aser-first-run-") as tmp:
        clone, logs = Path(tmp) / "aser", Path(tmp)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True)
        env = {**os.environ, "ASER_CACHE": str(Path(tmp) / "cache"), "VIRTUAL_ENV": str(clone / ".venv"),
               "PATH": f"{clone / '.venv' / 'bin'}:{os.environ['PATH']}"}
        env.pop("PYTHONPATH", None)
        out["first_run_wall_s"] = timed(command, clone, env, logs / "first.log")
        first_dest = clone / "aser-out" / "smollm2-135m-w4a8"
        manifest = json.loads((first_dest / "aser_manifest.json").read_text())
        out["first_run_calibration"] = manifest["config"]["calib"]
        out["first_run_quantize_s"] = manifest["summary"]["wall_s"]
        out["first_run_log_tail"] = (logs / "first.log").read_text()[-1500:]

        tok = AutoTokenizer.from_pretrained(str(first_dest))
        windows = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), 512, a.eval_windows)
        out["eval"] = f"{windows.shape[0]} x 512 of {data_relative(a.eval)}"
        out["first_run_ppl"] = perplexity_of(first_dest, windows)
        if not a.skip_full:
            full_dest = clone / "aser-out" / "full"
            out["full_wall_s"] = timed(f"aser quantize builtin:smollm2-135m {full_dest} --num-samples 128 --seq-len 512",
                                       clone, env, logs / "full.log")
            out["full_ppl"] = perplexity_of(full_dest, windows)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
