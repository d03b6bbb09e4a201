#!/usr/bin/env bash
# The one script to run on a GPU machine (one H200: about 6 minutes; budget 8).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run [OUTDIR]  # the same steps on CPU, tiny sizes (CI runs this)
#
# Steps, each with its own time limit, each recorded (rc, seconds, log tail) even when it fails:
#   kernels   the Triton kernels compiled for this GPU vs the torch references and float64 math
#             (benchmarks/gpu_kernels.py, the kernel tests' tolerances)
#   gemm      python -m aser.kernels.bench.gemm --quick: TOPS vs torch bf16 and torch._int_mm,
#             % of the INT8 dense peak (1979 TOPS on H100/H200)
#   quantize  aser quantize --format w4a8-int of stories260K with GPU workers (Ray, calibration actors and
#             reconstruction tasks on the GPU), then aser eval (perplexity through the kernels)
#   quantize_pack, eval_pack  the same with --format w4a16-pack: the pack-quantized files vLLM's
#             Marlin serves, evaluated with Marlin's INT8 activation quantizer (fp32 scales)
#   scale     benchmarks/scale_layer.py: two Llama-3-70B-sized layers through the pipeline on the
#             GPU, stage times and peak host/GPU memory per process
#   smollm2_shape  the same at SmolLM2-135M's shape and depth, 128 x 512 calibration tokens
# Everything lands in OUTDIR/gpu_check.json (plus each step's own JSON and a log).
# Wheels in .whl/ (a machine without package access) are installed first, to /tmp/site.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR=$(mkdir -p "${1:-${OUT:-gpu_check_out}}" && cd "${1:-${OUT:-gpu_check_out}}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DATA=${ASER_TEST_DATA:-}
for d in "$DATA" "$ROOT/.devdata" "$ROOT/../shared/data"; do
  if [[ -n "$d" && -d "$d/stories260K" ]]; then DATA=$d; break; fi
done
WORK=$(mktemp -d /tmp/aser-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
STEPS="$WORK/steps.tsv"
: > "$STEPS"

if [[ -d "$ROOT/.whl" ]] && ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi

descendants() {  # every process below PID (Ray's raylet and workers of a driver that started Ray)
  local c
  for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done
}

step() {  # step NAME LIMIT_S CMD...: run, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  "$@" > "$WORK/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2> /dev/null && (( SECONDS - t0 < limit )); do sleep 1; done
  if kill -0 "$pid" 2> /dev/null; then
    # Over its time: every Python process of the step prints its threads' stacks (faulthandler
    # on SIGUSR1, registered by aser.workers.device), then the step is stopped.
    local procs
    procs="$pid $(descendants "$pid")"
    kill -USR1 $procs 2> /dev/null
    sleep 3
    kill -TERM "$pid" 2> /dev/null
    sleep 5
    kill -KILL $procs 2> /dev/null
    wait "$pid" 2> /dev/null
    rc=124
    for f in /tmp/ray/session_latest/logs/worker-*.err; do
      [[ -f "$f" ]] && grep -q "most recent call first" "$f" && { echo "== stacks in $f"; tail -n 80 "$f"; }
    done >> "$WORK/$name.log"
  else
    wait "$pid"
    rc=$?
  fi
  cat "$WORK/$name.log" >> "$LOG"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

CALIB="$DATA/tinystories/sample.txt"
EVAL="$DATA/wikitext2/test.raw.txt"
[[ -f "$EVAL" ]] || EVAL=$(ls "$DATA"/wikitext2/*test* 2>/dev/null | head -1)
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  step kernels 300 "$PY" benchmarks/gpu_kernels.py --smoke --out "$OUTDIR/kernels.json"
  step gemm 120 "$PY" -m aser.kernels.bench.gemm --smoke --out "$OUTDIR/gemm.json"
  step quantize 600 "$PY" -m aser.pipeline.cli quantize "$DATA/stories260K" "$WORK/dest" --calib "$CALIB" \
    --num-samples 8 --seq-len 64 --workers 1 --no-progress --json --format w4a8-int
  step eval 300 "$PY" -m aser.pipeline.cli eval "$WORK/dest" --eval "$EVAL" --seq-len 256 --max-windows 2 --json
  step quantize_pack 600 "$PY" -m aser.pipeline.cli quantize "$DATA/stories260K" "$WORK/dest_pack" --calib "$CALIB" \
    --num-samples 8 --seq-len 64 --workers 1 --no-progress --json --format w4a16-pack
  step eval_pack 300 "$PY" -m aser.pipeline.cli eval "$WORK/dest_pack" --eval "$EVAL" --seq-len 256 --max-windows 2 --json
  step scale 600 "$PY" benchmarks/scale_layer.py --out "$WORK/scale" --data "$DATA" --hidden 256 \
    --intermediate 896 --heads 8 --kv-heads 2 --num-samples 2 --seq-len 64 --rank 8 --json "$OUTDIR/scale.json"
else
  step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_mode --format=csv; \
    $PY -c 'import time; t = time.time(); import torch; torch.zeros(1, device=\"cuda\"); print(\"cuda init s\", time.time() - t); import triton, ray, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, ray.__version__, transformers.__version__, torch.cuda.get_device_name())'"
  step kernels 120 "$PY" benchmarks/gpu_kernels.py --out "$OUTDIR/kernels.json"
  # 2026-11-29, first H200 run: the default (GPU calibration + GPU reconstruction) did not finish
  # stories260K's first layer in 75 s, with no error logged. Three runs bisect it: no GPU, GPU
  # calibration only, both; a step that overruns prints every process's Python stack.
  for variant in cpu:"--gpus-per-worker 0 --reconstruct-gpus 0" gpu_calib:"--reconstruct-gpus 0" gpu:""; do
    # shellcheck disable=SC2086  # the flags are meant to split
    step "quantize_${variant%%:*}" 75 "$PY" -m aser.pipeline.cli quantize "$DATA/stories260K" \
      "$WORK/dest_${variant%%:*}" --calib "$CALIB" --num-samples 16 --seq-len 256 --json --format w4a8-int ${variant#*:}
  done
  DEST=""
  for d in gpu gpu_calib cpu; do [[ -f "$WORK/dest_$d/config.json" ]] && { DEST="$WORK/dest_$d"; break; }; done
  step eval 60 "$PY" -m aser.pipeline.cli eval "${DEST:-$WORK/dest_gpu}" --eval "$EVAL" --seq-len 256 --max-windows 40 --json
  step quantize_pack 75 "$PY" -m aser.pipeline.cli quantize "$DATA/stories260K" "$WORK/dest_pack" --calib "$CALIB" \
    --num-samples 16 --seq-len 256 --json --format w4a16-pack
  step eval_pack 60 "$PY" -m aser.pipeline.cli eval "$WORK/dest_pack" --eval "$EVAL" --seq-len 256 --max-windows 40 --json
  step scale 150 "$PY" benchmarks/scale_layer.py --out "$WORK/scale" --data "$DATA" --num-samples 8 \
    --seq-len 512 --json "$OUTDIR/scale.json"
  # SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9/3 heads; random weights, a 512-token
  # vocabulary) at the README's 128 x 512 calibration: the time of the real model's run on a GPU.
  step smollm2_shape 120 "$PY" benchmarks/scale_layer.py --out "$WORK/smol" --data "$DATA" --layers 30 \
    --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 --num-samples 128 --seq-len 512 \
    --json "$OUTDIR/smollm2_shape.json"
  step gemm 90 "$PY" -m aser.kernels.bench.gemm --quick --ranks 0,32 --out "$OUTDIR/gemm.json"
fi
for f in "$WORK"/quantize*.log; do [[ -f "$f" ]] && cat "$f"; done > "$OUTDIR/quantize.out"
[[ -f "$WORK/eval.log" ]] && cp "$WORK/eval.log" "$OUTDIR/eval.out"

"$PY" - "$STEPS" "$WORK" "$OUTDIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

steps_tsv, work, outdir, dry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"


def last_json(text):
    """The last top-level JSON object printed (the CLI's --json output follows its logs)."""
    dec = json.JSONDecoder()
    found = None
    for i, c in enumerate(text):
        if c == "{" and (i == 0 or text[i - 1] == "\n"):
            try:
                found = dec.raw_decode(text[i:])[0]
            except ValueError:
                pass
    return found


report = {"dry_run": dry, "steps": {}}
for line in steps_tsv.read_text().splitlines():
    name, rc, secs = line.split("\t")
    log = (work / f"{name}.log").read_text(errors="replace")
    entry = {"rc": int(rc), "seconds": int(secs), "log_tail": log[-1500:]}
    own = outdir / f"{name}.json"
    if own.exists():
        entry["result"] = json.loads(own.read_text())
    elif name.startswith(("quantize", "eval")):
        entry["result"] = last_json(log)
    report["steps"][name] = entry
report["ok"] = all(s["rc"] == 0 for s in report["steps"].values())
(outdir / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: {"rc": v["rc"], "seconds": v["seconds"]} for k, v in report["steps"].items()}))
sys.exit(0 if report["ok"] else 1)
EOF
