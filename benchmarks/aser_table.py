"""The ASER results table on a real model: every method at W4A8 per-channel, one run.

    python benchmarks/aser_table.py                  # the README table (test split)
    python benchmarks/aser_table.py --sweep          # hyperparameter sweep on held-out validation

Calibration: 128 x 512 tokens drawn from the first 80 % (by lines) of WikiText-2's validation
text; the sweep evaluates on windows of the last 20 %, which calibration never sees; the table
evaluates on the first 40 non-overlapping 512-token windows of the WikiText-2 test split (and,
with --full-test, on all of it at 2048). Statistics come from one FP pass and are shared by all
methods (propagate = fp), so every method sees exactly the same calibration data.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from aser.pipeline import data, evaluate, simulate
from aser.pipeline.sources import cache_dir, localize, shared_data_dir
from aser.workers.reconstruct import MethodConfig

ROOT = Path(__file__).resolve().parent


def split_validation(text: str, frac: float = 0.8) -> tuple[str, str]:
    lines = text.split("\n")
    cut = int(len(lines) * frac)
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])


def table_configs(base: MethodConfig) -> list[tuple[str, MethodConfig]]:
    m = lambda name, **kw: replace(base, method=name, **kw)  # noqa: E731
    rows = [
        ("rtn", m("rtn", rank=0)),
        ("smoothquant", m("smoothquant", rank=0)),
        ("lorc", m("lorc")),
        ("l2qer", m("l2qer")),
        ("er", m("er")),
        ("aser", m("aser")),
        ("aser, side columns within the rank budget", m("aser", reserve_rank=True)),
        ("gptq", m("gptq", rank=0)),
        ("gptq+aser", m("gptq+aser")),
    ]
    for r in (8, 16, 64, 128):
        rows.append(("er", m("er", rank=r)))
        rows.append(("aser", m("aser", rank=r)))
    rows.append(("gptq+er", m("gptq+er")))
    rows.append(("aser, paper reading (f=32 into the low-rank path)", m("aser", num_outliers=32, outlier_mode="lowrank")))
    return rows


def sweep_configs(base: MethodConfig) -> list[tuple[str, MethodConfig]]:
    """The readings of ASER step 1 measured against ER at r = 32 (held-out validation only)."""
    a = lambda **kw: replace(base, method="aser", **kw)  # noqa: E731
    return [
        ("er", replace(base, method="er")),
        ("lowrank f=8", a(outlier_mode="lowrank", num_outliers=8)),
        ("side f=8", a(outlier_mode="side", num_outliers=8)),
        ("side f=8 reserve", a(outlier_mode="side", num_outliers=8, reserve_rank=True)),
        ("side f=16 reserve", a(outlier_mode="side", num_outliers=16, reserve_rank=True)),
        ("side f=8 alpha=1", a(outlier_mode="side", num_outliers=8, alpha=1.0)),
        ("smooth all, alpha searched, no extraction",
         a(outlier_mode="none", smooth_channels="all", alpha_grid=(0.0, 0.25, 0.5))),
        ("side reserve, f and alpha searched per group",
         a(outlier_mode="side", reserve_rank=True, alpha_grid=(0.5, 1.0), outlier_grid=(0, 8))),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="builtin:smollm2-135m")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-windows", type=int, default=12)
    p.add_argument("--full-test", action="store_true", help="also all test windows of 2048 tokens")
    p.add_argument("--only", nargs="*", default=None, help="row labels to run (default all)")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = shared_data_dir()
    path = localize(a.source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    calib_text, heldout_text = split_validation(data.load_text(str(d / "wikitext2" / "valid.tokenized.txt")))
    calib = data.calibration_windows(data.tokenize(tok, calib_text), a.num_samples, a.seq_len, seed=0)
    if a.sweep:
        evals = {"heldout": data.eval_windows(data.tokenize(tok, heldout_text), a.seq_len, a.sweep_windows)}
    else:
        test_ids = data.tokenize(tok, data.load_text(str(d / "wikitext2" / "test.raw.txt")))
        evals = {"test": data.eval_windows(test_ids, a.seq_len, a.max_windows)}
        if a.full_test:
            evals["test_full_2048"] = data.eval_windows(test_ids, 2048, None)

    t0 = time.perf_counter()
    # Statistics depend only on the model and the calibration tokens: cache them across runs
    # (the sweep and the table share them).
    cache = cache_dir() / "bench" / f"stats-{data.tokens_hash(calib)[:16]}-{Path(path).name}.pt"
    if cache.is_file():
        fp_stats, stats_s = torch.load(cache, weights_only=False)
        print(f"statistics: cached {cache} (measured {stats_s:.1f} s)", file=sys.stderr)
    else:
        fp_stats, stats_s = simulate.collect_fp_stats(model, calib, batch_size=8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((fp_stats, stats_s), cache)
        print(f"statistics (one FP pass, {calib.numel()} tokens): {stats_s:.1f} s", file=sys.stderr)
    results = []
    fp_row = {"label": "fp", "method": "fp", "rank": 0, "extra_params_pct": 0.0, "seconds": 0.0}
    for name, w in evals.items():
        fp_row[f"ppl_{name}"] = evaluate.perplexity(model, w, 1 if w.shape[1] > 1024 else 4)
    results.append(fp_row)
    print(json.dumps(fp_row), file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "sweep" if a.sweep else "table"

    def save(rows: list[dict]) -> None:  # after every row: a long run keeps what it measured
        meta = {"source": a.source, "num_samples": a.num_samples, "seq_len": a.seq_len,
                "calibration_tokens_sha256": data.tokens_hash(calib), "statistics_s": stats_s,
                "total_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                "eval_windows": {k: list(v.shape) for k, v in evals.items()}}
        (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    base = MethodConfig()
    rows = sweep_configs(base) if a.sweep else table_configs(base)
    for label, cfg in rows:
        if a.only and label not in a.only:
            continue
        qmodel = copy.deepcopy(model)
        rep = simulate.apply_method(qmodel, cfg, fp_stats=fp_stats)
        extra, nbase = simulate.extra_params(qmodel)
        row = {"label": label, "method": cfg.method, "rank": cfg.rank,
               "extra_params_pct": 100.0 * extra / nbase, "seconds": rep.seconds["reconstruction"],
               "stage_seconds": rep.seconds, "config": cfg.to_dict()}
        for name, w in evals.items():
            row[f"ppl_{name}"] = evaluate.perplexity(qmodel, w, 1 if w.shape[1] > 1024 else 4)
        row["choices"] = [rec["choices"] for rec in rep.layers] if cfg.alpha_grid or cfg.outlier_grid else None
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("choices", "config")}), file=sys.stderr)
        del qmodel
        save(results)
    cols = list(evals)
    print(f"\n| method | r | " + " | ".join(f"ppl ({c})" for c in cols) + " | extra params % | seconds |")
    print("|---|---|" + "---|" * len(cols) + "---|---|")
    for r in results:
        print(f"| {r['label']} | {r['rank']} | " + " | ".join(f"{r['ppl_' + c]:.2f}" for c in cols)
              + f" | {r['extra_params_pct']:.2f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
