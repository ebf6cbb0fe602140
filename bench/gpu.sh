#!/usr/bin/env bash
# The GPU table of docs/performance.md: densekit (create_model's default, fused=True) against
# torchvision (eager, and with memory_efficient=True: torchvision's gradient checkpointing) and
# timm where it is installed, same card, same run, alternating rounds.
#
#   bash bench/gpu.sh            # from anywhere; needs only torch + torchvision (timm optional)
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Runs from the source tree (PYTHONPATH=src, nothing to install) and writes
# bench/results/<card>-torch<X.Y>.json and .md. Budget: under 8 minutes on one H100:
# about 2.5 minutes of timed steps at the torchvision rates docs/performance.md quotes for an H100,
# plus warm-up (cuDNN's search for each new shape) and one CUDA start-up per invocation.
# STEPS / ROUNDS / WARMUP scale it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
STEPS="${STEPS:-20}"      # timed steps per round; with ROUNDS=3, 60 pooled per figure
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-5}"     # covers cuDNN's kernel search (cudnn.benchmark) and allocator growth

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "bench/gpu.sh: $PY cannot import torch or sees no CUDA device" >&2; exit 2; }
# BENCH_OUT overrides where the JSON goes (the .md goes beside it)
OUT="${BENCH_OUT:-$("$PY" -c 'from densekit.bench.env import default_out, environment; print(default_out(environment(), ["cuda"]))')}" || exit 1
MD="${OUT%.json}.md"
rm -f "$OUT"
status=0
start=$SECONDS

bench() {  # the first call creates the results file, the others add to it
  local append=()
  [ -e "$OUT" ] && append=(--append)
  echo "== densekit bench $*" >&2
  "$PY" -m densekit bench --device cuda --warmup "$WARMUP" --out "$OUT" --md "$MD" "${append[@]}" "$@" >/dev/null || status=1
}

# DenseNet-121, 224 px, batch 128, bf16 channels_last training (target: >= 1.5x img/s at <= 0.5x memory)
bench --models densenet121 --batch-size 128 --dtype bf16 --layout channels_last --mode train \
      --impl densekit torchvision torchvision-me timm --steps "$STEPS" --rounds "$ROUNDS"
# the same in fp32 NCHW, torchvision's default
bench --models densenet121 --batch-size 128 --dtype fp32 --layout nchw --mode train \
      --impl densekit torchvision --steps "$STEPS" --rounds "$ROUNDS"
# DenseNet-121 inference, batch 256, bf16 (target: >= 1.3x)
bench --models densenet121 --batch-size 256 --dtype bf16 --layout channels_last --mode infer \
      --impl densekit torchvision timm --steps "$STEPS" --rounds "$ROUNDS"
# DenseNet-BC-100 k=12, 32 px, bf16 training at batch 64 (target: >= 8x, warm-up <= 30 s), and at 256;
# densekit-eager is the same step without the CUDA graph
bench --models densenet_bc_100_k12 --batch-size 64 --input-size 32 --dtype bf16 --layout nchw channels_last \
      --mode train --impl densekit densekit-eager torchvision torchvision-me --steps "$STEPS" --rounds "$ROUNDS"
bench --models densenet_bc_100_k12 --batch-size 256 --input-size 32 --dtype bf16 --layout nchw \
      --mode train --impl densekit torchvision --steps "$STEPS" --rounds "$ROUNDS"
# Peak training memory against depth, DenseNet-BC k=12, L = 100, 190, 250 (target: linear)
bench --models densenet_bc_100_k12 --depths 100 190 250 --batch-size 64 --input-size 32 --dtype bf16 \
      --layout nchw --mode train --impl densekit torchvision torchvision-me --steps 10 --rounds 2

"$PY" -m densekit bench --render "$OUT" || status=1
echo "wrote $OUT and $MD in $((SECONDS - start)) s" >&2
exit $status
