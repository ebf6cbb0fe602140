#!/usr/bin/env bash
# The CPU table of docs/performance.md: densekit against torchvision on this machine's cores.
#
#   bash bench/cpu.sh
#
# Every configuration runs in its own process, so its peak RSS growth is its own; densekit
# and torchvision alternate (A B, then B A) so load from other users weighs on both.
# Writes bench/results/cpu-torch<X.Y>.json and .md. About 6 minutes on 2 idle cores (an
# estimate from per-step times; shared with two other jobs it took 30); STEPS=5 halves the
# first part, at the cost of 10 pooled steps per figure instead of 20.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python}"
STEPS="${STEPS:-10}"      # per round; two rounds give the 20 pooled steps each figure is the median of

OUT="$("$PY" -c 'from densekit.bench.env import default_out, environment; print(default_out(environment(), ["cpu"]))')" || exit 1
MD="${OUT%.json}.md"
rm -f "$OUT"
status=0
start=$SECONDS

bench() {
  local append=()
  [ -e "$OUT" ] && append=(--append)
  echo "== densekit bench $*" >&2
  "$PY" -m densekit bench --device cpu --out "$OUT" --md "$MD" "${append[@]}" "$@" >/dev/null || status=1
}

# DenseNet-BC-100 k=12 on 28 px single-channel images (Fashion-MNIST's shape), batch 64, fp32 NCHW:
# targets >= 1.3x torchvision's img/s in training (at <= 0.4x its memory) and in inference
bench --models densenet_bc_100_k12 --input-size 28 --in-chans 1 --batch-size 64 --mode train infer \
      --impl densekit torchvision --steps "$STEPS" --warmup 2 --rounds 2
# Peak training memory against depth (L = 100, 190, 250) at batch 16. A training step reaches
# its peak on the first step (momentum buffers included), so two timed steps measure memory;
# their img/s are not figures to quote. With glibc's default, whose mmap threshold adapts,
# freed blocks stay resident and identical runs differ by 10-15% in peak RSS; a fixed
# threshold returns every block over 64 KiB on free, so peak RSS follows the live tensors
# (to within 1 MiB between repeats) and a 3-point fit can tell a line from a curve.
MALLOC_MMAP_THRESHOLD_=65536 bench --models densenet_bc_100_k12 --depths 100 190 250 --input-size 28 \
      --in-chans 1 --batch-size 16 --mode train --impl densekit torchvision --steps 2 --warmup 1 --rounds 1

"$PY" -m densekit bench --render "$OUT" || status=1
echo "wrote $OUT and $MD in $((SECONDS - start)) s" >&2
exit $status
