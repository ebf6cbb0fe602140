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
# run and a log) and bench/results/<card>-torch<X.Y>.json/.md. With $OUT set (a device
# session, which brings back at most 8 files), everything goes into one archive,
# $OUT/gpu-session.tgz, written on exit whatever happened, beside a short $OUT/summary.txt.
# The IDX files must travel with the checkout: copy them into the git-ignored .data/ and
# name .data/fashion-mnist in the call's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
DATA="${DATA:-${DENSEKIT_DATA:-/usr/share/datasets/fashion-mnist}}"
BUDGET="${BUDGET:-540}"          # seconds this script may use in all; each phase is cut off at what is left
start=$SECONDS
status=0
if [ -n "${OUT:-}" ]; then
  RESULTS="$(mktemp -d)/gpu-session"
  pack() {
    tar czf "$OUT/gpu-session.tgz" -C "$(dirname "$RESULTS")" gpu-session
    { cat "$RESULTS/env.txt" 2>/dev/null; grep -h "" "$RESULTS"/*.brief 2>/dev/null
      ls "$RESULTS"/*.md 2>/dev/null | head -1 | xargs -r cat; } > "$OUT/summary.txt"
  }
  trap pack EXIT
else
  RESULTS="bench/results/gpu-session"
fi
mkdir -p "$RESULTS"
left() { local s=$((BUDGET - (SECONDS - start))); echo $((s > 1 ? s : 1)); }  # timeout 0 would mean none

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || { echo "gpu_session.sh: $PY cannot import torch or sees no CUDA device" >&2; exit 2; }
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
          torch.cuda.get_device_name())' | tee "$RESULTS/env.txt"

have_data=1
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -e "$DATA/$f" ] || [ -e "$DATA/$f.gz" ] || have_data=0
done
[ "$have_data" = 1 ] || { echo "gpu_session.sh: no Fashion-MNIST IDX files in $DATA; training skipped" >&2; status=1; }

train() {  # train PRESET SECONDS: one run, cut off after SECONDS, its summary copied to $RESULTS/PRESET.json
  local dir
  dir="$(mktemp -d)/$1"
  echo "== densekit train --recipe $1 ($((SECONDS - start)) s in, at most $2 s)" >&2
  if timeout -k 10 "$2" "$PY" -m densekit train --dataset fashion-mnist --data-dir "$DATA" --recipe "$1" \
       --out "$dir" --no-progress > "$RESULTS/$1.log" 2>&1; then
    cp "$dir/summary.json" "$RESULTS/$1.json"
    cp "$dir/metrics.jsonl" "$RESULTS/$1.metrics.jsonl"
    "$PY" - "$RESULTS/$1.json" > "$RESULTS/$1.brief" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['recipe']['name']}: {s['test_accuracy']:.4f} test accuracy, {s['train_seconds']:.1f} s of training, "
      f"{s['images_per_second']:.0f} img/s, {s['params']:,} params, CUDA graph captured: {s.get('cuda_graph_captured')}")
PY
    cat "$RESULTS/$1.brief" >&2
    grep -q "captured: True" "$RESULTS/$1.brief" || { echo "gpu_session.sh: $1 ran without its CUDA graph" >&2; status=1; }
  else
    status=1; echo "$1: failed or cut off (see $1.log)" > "$RESULTS/$1.brief"; tail -20 "$RESULTS/$1.log" >&2
  fi
}

[ "$have_data" = 1 ] && train sprint "$(( $(left) < 240 ? $(left) : 240 ))"
table="$("$PY" -c 'import os; from densekit.bench.env import default_out, environment
print(os.path.basename(default_out(environment(), ["cuda"])))')" || table=gpu.json
STEPS=15 ROUNDS=2 WARMUP=5 BENCH_OUT="$RESULTS/$table" PYTHON="$PY" timeout -k 10 "$(left)" bash bench/gpu.sh \
  2> >(tee "$RESULTS/bench.log" >&2) || status=1

# long: 40 epochs at 128 a batch; estimate its time from sprint's measured img/s
remaining=$(left)
need="$("$PY" - "$RESULTS/sprint.json" <<'PY' 2>/dev/null || echo 100000
import json, sys
s = json.load(open(sys.argv[1]))
print(int(40 * s["train_images"] / s["images_per_second"] * 1.2 + 60))  # smaller batches: 20% slower, + eval
PY
)"
if [ "$have_data" = 1 ] && [ "$remaining" -gt "$need" ]; then
  train long "$remaining"
else
  echo "== long skipped: needs about $need s, $remaining s left" | tee "$RESULTS/long.skipped" >&2
fi
echo "gpu_session.sh: done in $((SECONDS - start)) s" >&2
exit $status
