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
from typing import Any

import torch

from aser.pipeline import data, evaluate, simulate
from aser.pipeline.manifest import ADAPTER_VALUE_BITS, ExtraCost, extra_cost
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
    # The rank sweep of the remaining methods (the perplexity vs extra bits plot), appended so
    # an earlier table.json resumes with these as the only rows left to run.
    for r in (8, 16, 64, 128):
        rows.extend((name, m(name, rank=r)) for name in ("lorc", "l2qer", "gptq+er", "gptq+aser"))
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


def row_key(label: str, config: dict[str, Any]) -> str:
    """A row is the same measurement when its label and its full method config agree."""
    return json.dumps([label, config], sort_keys=True)


def previous_rows(path: Path, calib_hash: str, evals: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run to reuse: only if it calibrated on the same tokens and evaluated
    on windows of the same shapes (otherwise its perplexities are not comparable)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same_eval = old["meta"].get("eval_windows") == {k: list(v.shape) for k, v in evals.items()}
    if old["meta"].get("calibration_tokens_sha256") != calib_hash or not same_eval:
        print(f"resume: {path} used other calibration or eval windows; running every row", file=sys.stderr)
        return {}
    return {row_key(r["label"], r["config"]): r for r in old["rows"] if "config" in r}


# ---------------------------------------------------------------- the report (no model run)

TRADEOFF_METHODS = ("rtn", "lorc", "l2qer", "er", "aser", "gptq+er", "gptq+aser")
TRADEOFF_RANKS = (8, 16, 32, 64, 128)
PLOT_NAME = "ppl_vs_extra_bits.png"


def linear_shapes(source: str) -> list[tuple[int, int]]:
    """(N, K) of every linear the methods quantize (those of the decoder layers), from the config
    alone (meta tensors: nothing is loaded)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(localize(source)))
    return [(m.out_features, m.in_features) for m in simulate.decoder_layers(model).modules() if isinstance(m, nn.Linear)]


def analytic_cost(config: dict[str, Any] | None, shapes: list[tuple[int, int]]) -> ExtraCost:
    """The shipped adapter of a row from its config, for rows measured before the count moved to
    the adapter tensors: per linear, (rank + f)·(N + K) values, f = ASER's side columns (each a
    column of L_A and a one-hot row of L_B), inside the rank when reserve_rank."""
    rank = f = 0
    if config is not None:
        rank = config["rank"]
        if config["method"] in ("aser", "gptq+aser") and config["outlier_mode"] == "side":
            f = config["num_outliers"]
            if config["outlier_grid"] and not config["reserve_rank"]:
                raise ValueError("f searched per group outside the rank: only the tensors can count it")
        rank = max(rank - f, 0) + f if config["reserve_rank"] else rank + f
    return extra_cost([((rank, N + K), ADAPTER_VALUE_BITS) for N, K in shapes] if rank else [],
                      sum(N * K for N, K in shapes))


def fill_costs(rows: list[dict[str, Any]], shapes: list[tuple[int, int]]) -> None:
    """Give every row the shipped cost; a row counted on its tensors must agree with the formula."""
    for row in rows:
        cost = analytic_cost(row.get("config"), shapes).to_dict()
        if "adapter_values" in row and row["adapter_values"] != cost["adapter_values"]:
            raise AssertionError(f"{row['label']} r={row['rank']}: tensors {row['adapter_values']} != formula {cost}")
        row.update(cost)


def interpolate(x: float, points: list[tuple[float, float]]) -> float | None:
    """Piecewise-linear y at x in log2(x) over sorted (x, y) points; None outside their range."""
    import math

    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    return None


def tradeoff(rows: list[dict[str, Any]], col: str) -> dict[str, list[tuple[int, float, float]]]:
    """method -> [(r, extra bits per weight, ppl)] of the plain rows (label == method)."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r["label"] in TRADEOFF_METHODS and (r["rank"] in TRADEOFF_RANKS or r["rank"] == 0):
            curves.setdefault(r["label"], []).append((r["rank"], r["extra_bits_per_weight"], r[f"ppl_{col}"]))
    return {m: sorted(curves[m]) for m in TRADEOFF_METHODS if m in curves}


def plot(curves: dict[str, list[tuple[int, float, float]]], rows: list[dict[str, Any]], col: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, pts in curves.items():
        pts = [p for p in pts if p[1] > 0]
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=method)
            for r, x, y in pts:
                ax.annotate(str(r), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    flat = {r["label"]: r[f"ppl_{col}"] for r in rows if r["rank"] == 0}
    for label, style in (("fp", ":"), ("rtn", "--"), ("gptq", "-.")):
        if label in flat:
            ax.axhline(flat[label], color="grey", linestyle=style, linewidth=1, label=f"{label} (0 extra bits)")
    reserve = [r for r in rows if r["label"].startswith("aser, side columns within")]
    for r in reserve:
        ax.plot(r["extra_bits_per_weight"], r[f"ppl_{col}"], marker="*", markersize=12, linestyle="none",
                color="black", label=f"aser, f=8 inside r={r['rank']}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("extra bits per quantized weight (16-bit adapter values, side columns included)")
    ax.set_ylabel(f"perplexity (WikiText-2 {col}, lower is better)")
    ax.set_title("SmolLM2-135M (a dequantized Q4_1 GGUF), W4A8 per-channel; labels: rank r", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, tag: str, source: str) -> int:
    """Fill the shipped cost into the saved rows, print the markdown tables, draw the plot."""
    path = out / f"{tag}.json"
    saved = json.loads(path.read_text())
    rows = saved["rows"]
    fill_costs(rows, linear_shapes(source))
    path.write_text(json.dumps(saved, indent=1))
    cols = [k.removeprefix("ppl_") for k in rows[0] if k.startswith("ppl_")]
    print("| method | r | " + " | ".join(f"ppl ({c})" for c in cols) + " | extra bits / weight | extra params % | seconds |")
    print("|---|---|" + "---|" * len(cols) + "---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['rank']} | " + " | ".join(f"{r['ppl_' + c]:.2f}" for c in cols)
              + f" | {r['extra_bits_per_weight']:.3f} | {r['extra_params_pct']:.2f} | {r['seconds']:.1f} |")
    if tag != "table":
        return 0
    curves = tradeoff(rows, cols[0])
    print("\n| method | " + " | ".join(f"r = {r}" for r in TRADEOFF_RANKS) + " |")
    print("|---|" + "---|" * len(TRADEOFF_RANKS))
    for method in TRADEOFF_METHODS:
        by_rank = {r: (x, y) for r, x, y in curves.get(method, [])}
        if 0 in by_rank:
            x, y = by_rank[0]
            cells = [f"{y:.2f} @ 0 (rank 0)"] + [""] * (len(TRADEOFF_RANKS) - 1)
        else:
            cells = [f"{by_rank[r][1]:.2f} @ {by_rank[r][0]:.3f}" if r in by_rank else "—" for r in TRADEOFF_RANKS]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nAt equal shipped bits (the rank-r-only curve interpolated in log2(bits) at the side-column method's bits):")
    for with_side, without in (("aser", "er"), ("gptq+aser", "gptq+er")):
        ref = [(x, y) for _, x, y in curves.get(without, [])]
        for r, x, y in curves.get(with_side, []):
            y_ref = interpolate(x, ref)
            shown = "outside the measured range" if y_ref is None else f"{y_ref:.2f}"
            print(f"  {with_side} r={r}: {x:.3f} bits, ppl {y:.2f}; {without} at the same bits: {shown}")
    plot(curves, rows, cols[0], out / PLOT_NAME)
    print(f"\nplot: {out / PLOT_NAME}", file=sys.stderr)
    return 0



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
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run with the same calibration and eval windows")
    p.add_argument("--report", action="store_true",
                   help="only the markdown table (and, for the table, the plot) from the saved JSON")
    a = p.parse_args()
    if a.report:
        return report(Path(a.out), "sweep" if a.sweep else "table", a.source)
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
    fp_row = {"label": "fp", "method": "fp", "rank": 0, "extra_params_pct": 0.0, "extra_bits_per_weight": 0.0,
              "seconds": 0.0}
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
    done = previous_rows(out / f"{tag}.json", data.tokens_hash(calib), evals) if a.resume else {}
    for label, cfg in rows:
        if a.only and label not in a.only:
            continue
        if (key := row_key(label, cfg.to_dict())) in done:
            results.append(done[key])
            continue
        qmodel = copy.deepcopy(model)
        rep = simulate.apply_method(qmodel, cfg, fp_stats=fp_stats)
        row = {"label": label, "method": cfg.method, "rank": cfg.rank, **simulate.extra_params(qmodel).to_dict(),
               "seconds": rep.seconds["reconstruction"], "stage_seconds": rep.seconds, "config": cfg.to_dict()}
        for name, w in evals.items():
            row[f"ppl_{name}"] = evaluate.perplexity(qmodel, w, 1 if w.shape[1] > 1024 else 4)
        row["choices"] = [rec["choices"] for rec in rep.layers] if cfg.alpha_grid or cfg.outlier_grid else None
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("choices", "config")}), file=sys.stderr)
        del qmodel
        save(results)
    return report(out, tag, a.source)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
