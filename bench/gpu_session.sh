#!/usr/bin/env bash
# Everything to measure on a GPU, in one command of about 9 minutes (BUDGET seconds at most):
#   1. the `sprint` preset (goal: >= 95.0% Fashion-MNIST in <= 60 s of training, < 1M params),
#      and where it trained over 60 s, once more with the epochs that fit;
#   2. the GPU table of docs/performance.md (bench/gpu.sh), with fewer rounds;
#   3. the `long` preset (goal: > 95.4%), only if the time left allows it at sprint's speed.
#
#   DATA=/path/to/fashion-mnist BUDGET=540 bash bench/gpu_session.sh
#
# Needs only torch + torchvision (timm optional) and the Fashion-MNIST IDX files; runs from
# the source tree (PYTHONPATH=src). Results: bench/results/gpu-session/ (summary.json of each
# run and a log) and bench/results/<card>-torch<X.Y>.json/.md. With $OUT set (for a remote
# runner that brings back only a few files), everything goes into one archive,
# $OUT/gpu-session.tgz, written on exit whatever happened, beside a short $OUT/summary.txt.
# On a remote machine the IDX files must travel with the checkout (e.g. copied into its
# git-ignored .data/, with DATA=.data/fashion-mnist).
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

train() {  # train NAME SECONDS PRESET [ARGS...]: one run, cut off after SECONDS, its summary in $RESULTS/NAME.json
  local name="$1" limit="$2" preset="$3" dir
  shift 3
  dir="$(mktemp -d)/$name"
  echo "== densekit train --recipe $preset $* ($((SECONDS - start)) s in, at most $limit s)" >&2
  if timeout -k 10 "$limit" "$PY" -m densekit train --dataset fashion-mnist --data-dir "$DATA" --recipe "$preset" \
       "$@" --out "$dir" --no-progress > "$RESULTS/$name.log" 2>&1; then
    cp "$dir/summary.json" "$RESULTS/$name.json"
    cp "$dir/metrics.jsonl" "$RESULTS/$name.metrics.jsonl"
    "$PY" - "$RESULTS/$name.json" "$name" > "$RESULTS/$name.brief" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {s['test_accuracy']:.4f} test accuracy after {s['epochs_completed']} epochs, "
      f"{s['train_seconds']:.1f} s of training, {s['images_per_second']:.0f} img/s, {s['params']:,} params, "
      f"CUDA graph captured: {s.get('cuda_graph_captured')}")
PY
    cat "$RESULTS/$name.brief" >&2
    grep -q "captured: True" "$RESULTS/$name.brief" || { echo "gpu_session.sh: $name ran without its CUDA graph" >&2; status=1; }
  else
    status=1; echo "$name: failed or cut off (see $name.log)" > "$RESULTS/$name.brief"; tail -20 "$RESULTS/$name.log" >&2
  fi
}

[ "$have_data" = 1 ] && train sprint "$(( $(left) < 240 ? $(left) : 240 ))" sprint
# Over 60 s of training: once more with the epochs that fit in 57 s at the speed measured,
# so that the session still answers what sprint reaches within the limit (the preset's
# epochs are then set from it).
epochs="$("$PY" - "$RESULTS/sprint.json" <<'PY' 2>/dev/null
import json, sys
s = json.load(open(sys.argv[1]))
if s["train_seconds"] > 60 and s.get("cuda_graph_captured"):
    e = int(s["epochs_completed"] * 57 / s["train_seconds"])
    print(e if e >= 3 else "")
PY
)"
[ -n "$epochs" ] && train "sprint-e$epochs" "$(( $(left) < 180 ? $(left) : 180 ))" sprint --epochs "$epochs"
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
  train long "$remaining" long
else
  echo "== long skipped: needs about $need s, $remaining s left" | tee "$RESULTS/long.skipped" >&2
fi
echo "gpu_session.sh: done in $((SECONDS - start)) s" >&2
exit $status
