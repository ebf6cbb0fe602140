#!/usr/bin/env bash
# Everything a lent GPU should measure, in one command that fits one device session:
#   1. the `sprint` preset (issue 3: >= 95.0% Fashion-MNIST in <= 60 s of training, < 1M params);
#   2. the GPU table of docs/performance.md (bench/gpu.sh, issue 5), with fewer rounds;
#   3. the `long` preset (issue 3: > 95.4%), only if the time left allows it at sprint's speed.
#
#   DATA=/path/to/fashion-mnist BUDGET=540 bash bench/gpu_session.sh
#
# Needs only torch + torchvision (timm optional) and the Fashion-MNIST IDX files; runs from
# the source tree (PYTHONPATH=src). Results: bench/results/gpu-session/ (summary.json of each
# run and a log) and bench/results/<card>-torch<X.Y>.json/.md, or under $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
DATA="${DATA:-${DENSEKIT_DATA:-/usr/share/datasets/fashion-mnist}}"
BUDGET="${BUDGET:-540}"          # seconds this script may use in all
RESULTS="${OUT:-bench/results}/gpu-session"
mkdir -p "$RESULTS"
start=$SECONDS
status=0

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || { echo "gpu_session.sh: $PY cannot import torch or sees no CUDA device" >&2; exit 2; }
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
          torch.cuda.get_device_name())' | tee "$RESULTS/env.txt"

train() {  # train PRESET: one run, its summary copied to $RESULTS/PRESET.json
  local dir
  dir="$(mktemp -d)/$1"
  echo "== densekit train --recipe $1 ($((SECONDS - start)) s in)" >&2
  if "$PY" -m densekit train --dataset fashion-mnist --data-dir "$DATA" --recipe "$1" --out "$dir" \
       --no-progress > "$RESULTS/$1.log" 2>&1; then
    cp "$dir/summary.json" "$RESULTS/$1.json"
    cp "$dir/metrics.jsonl" "$RESULTS/$1.metrics.jsonl"
    tail -4 "$RESULTS/$1.log" >&2
  else
    status=1; tail -20 "$RESULTS/$1.log" >&2
  fi
}

train sprint
table="$("$PY" -c 'import os; from densekit.bench.env import default_out, environment
print(os.path.basename(default_out(environment(), ["cuda"])))')" || table=gpu.json
STEPS=15 ROUNDS=2 WARMUP=5 BENCH_OUT="$RESULTS/$table" bash bench/gpu.sh || status=1

# long: 40 epochs at 128 a batch; estimate its time from sprint's measured img/s
left=$((BUDGET - (SECONDS - start)))
need="$("$PY" - "$RESULTS/sprint.json" <<'PY' 2>/dev/null || echo 100000
import json, sys
s = json.load(open(sys.argv[1]))
print(int(40 * s["train_images"] / s["images_per_second"] * 1.2 + 60))  # smaller batches: 20% slower, + eval
PY
)"
if [ "$left" -gt "$need" ]; then
  train long
else
  echo "== long skipped: needs about $need s, $left s left" | tee "$RESULTS/long.skipped" >&2
fi
echo "gpu_session.sh: done in $((SECONDS - start)) s" >&2
exit $status
