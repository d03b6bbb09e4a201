"""The `aser` command line: builds configs from flags and hands them on; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aser.pipeline.config import PROPAGATE_MODES, CalibConfig, method_with_format
from aser.pipeline.flags import add_method_flags, given_format, given_method_fields
from aser.pipeline.sources import DEFAULT_SOURCE
from aser.workers.reconstruct import MethodConfig

if TYPE_CHECKING:
    from aser.pipeline.manifest import ExtraCost


def method_from_args(a: argparse.Namespace) -> MethodConfig:
    return MethodConfig.from_dict(method_with_format(given_method_fields(a), given_format(a)))


def _load(source: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aser.pipeline.sources import localize

    path = localize(source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def cmd_simulate(a: argparse.Namespace) -> int:
    import torch

    from aser.pipeline import data, evaluate, simulate

    cfg = method_from_args(a)
    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    model, tok = _load(a.source)
    eval_ids = data.eval_windows(data.tokenize(tok, data.load_text(a.eval)), a.seq_len, a.max_windows)
    ppl_fp = evaluate.perplexity(model, eval_ids, a.eval_batch_size)
    if a.calib:
        calib = data.calibration_windows(data.tokenize(tok, data.load_text(a.calib)), a.num_samples, a.seq_len, a.seed)
        calib_source = a.calib
    else:
        calib = data.self_generated_windows(model, tok, a.num_samples, a.seq_len, a.seed)
        calib_source = "self-generated (sampled from the model; no calibration text given)"

    def progress(i: int, n: int) -> None:
        if not a.json:
            print(f"\r[aser] layer {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    report = simulate.apply_method(model, cfg, tokens=calib, propagate=a.propagate, batch_size=a.batch_size, progress=progress)
    ppl = evaluate.perplexity(model, eval_ids, a.eval_batch_size)
    extra = simulate.extra_params(model)
    out = {
        "method": cfg.method, "rank": cfg.rank, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "num_samples": a.num_samples, "seq_len": a.seq_len, "ppl": ppl, "ppl_fp": ppl_fp,
        "num_windows": int(eval_ids.shape[0]), "seconds": time.perf_counter() - t_start,
        **extra.to_dict(), "calibration": calib_source,
        "calibration_tokens_sha256": data.tokens_hash(calib), "source": a.source,
        "stage_seconds": report.seconds, "method_config": cfg.to_dict(),
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"calibration: {calib_source}")
        print(f"{cfg.method} r={cfg.rank} W{cfg.w_bits}A{cfg.a_bits or 16}: ppl {ppl:.3f} (fp {ppl_fp:.3f}) "
              f"over {out['num_windows']} x {a.seq_len} tokens; {_extra_line(extra)}; {out['seconds']:.1f} s")
    return 0


def _extra_line(extra: ExtraCost) -> str:
    return f"adapter: {extra.bits_per_weight:.3f} extra bits per quantized weight ({extra.percent:.2f}% extra params)"


def cmd_eval(a: argparse.Namespace) -> int:
    from aser.pipeline.evaluate import evaluate_dest
    from aser.pipeline.manifest import shipped_extra_cost

    out = evaluate_dest(a.dest, a.eval, a.seq_len, a.max_windows)
    extra = shipped_extra_cost(a.dest)
    out.update(extra.to_dict())
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{a.dest}: ppl {out['ppl']:.3f} over {out['num_windows']} x {a.seq_len} tokens "
              f"({out.get('method')} r={out.get('rank')}, {_extra_line(extra)}, {out['seconds']:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aser", description=__doc__)
    p.add_argument("--debug", action="store_true", help="on an error, show its traceback instead of one line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("simulate", help="apply a method in memory (fake quantization) and report perplexity")
    s.add_argument("source", nargs="?", default=DEFAULT_SOURCE)
    add_method_flags(s)
    s.add_argument("--calib", default=None, help="calibration text (path or URL); default: sampled from the model")
    calib = CalibConfig()  # simulate calibrates as quantize does, with the same defaults
    s.add_argument("--num-samples", type=int, default=calib.num_samples)
    s.add_argument("--seq-len", type=int, default=calib.seq_len)
    s.add_argument("--eval", required=True, help="evaluation text (path or URL)")
    s.add_argument("--max-windows", type=int, default=40)
    s.add_argument("--propagate", default="fp", choices=PROPAGATE_MODES)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--eval-batch-size", type=int, default=4)
    s.add_argument("--seed", type=int, default=calib.seed)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)

    from aser.pipeline.quantize_cmd import add_quantize_parser

    add_quantize_parser(sub)
    from aser.pipeline.plan_cmd import add_plan_parser

    add_plan_parser(sub)
    from aser.pipeline.batch import add_batch_parser

    add_batch_parser(sub)

    e = sub.add_parser("eval", help="evaluate a quantized output directory with AserLinear modules")
    e.add_argument("dest")
    e.add_argument("--eval", required=True, help="evaluation text (path or URL)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=40)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("verify", help="re-read a destination and check every file against its manifest "
                                      "(sha256 and size); exit 1 on any mismatch")
    v.add_argument("dest", help="what `aser quantize` wrote (path or URL)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_verify)
    return p


def cmd_verify(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from aser.checkpoint import storage
    from aser.pipeline import verify

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="aser verify",
               disable=a.no_progress or a.json, file=sys.stderr, dynamic_ncols=True)

    def set_total(nbytes: int) -> None:
        bar.total = nbytes
        bar.refresh()

    with bar:
        report = verify.verify(a.dest, on_file=lambda _name, nbytes: bar.update(nbytes), on_total=set_total)
    if a.json:
        print(json.dumps(report.to_dict()))
    else:
        for f in report.findings:
            print(f"aser verify: {f.line()}", file=sys.stderr)
        state = "OK" if report.ok else f"FAILED, {len(report.findings)} problem(s)"
        print(f"{storage.redact(a.dest)}: {state}: {report.files_checked} files, "
              f"{report.bytes_checked / 2**20:.1f} MiB checked against {verify.manifest.MANIFEST_NAME}")
    return 0 if report.ok else 1


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    # SIGTERM (`ray job stop`, `scancel`, Kubernetes deleting the pod) unwinds like an error:
    # DEST's lease is released and a Ray this process started is shut down.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(a.func(a))
    except (ValueError, OSError) as e:  # configuration, input and storage errors: one line, no traceback
        if a.debug:
            raise
        print(f"aser: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
