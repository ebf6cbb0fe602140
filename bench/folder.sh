#!/usr/bin/env bash
# Training on an image collection too large to decode into memory: the figures of
# docs/performance.md#image-folders, on this machine's cores.
#
#   bash bench/folder.sh [DIR]
#
# Builds DIR (default /tmp/densekit-photos; kept when it exists, removed at the end when this
# script made it): 20,000 JPEGs of 256-384 px made from Fashion-MNIST (bench/photo_folder.py;
# 5.7 GB decoded). Then measures
#   1. the loader alone: decode + random resized crop + flip to 224 px, 2 workers (img/s);
#   2. densenet121 at 224 px, batch 16, for one step: wall time of the whole command
#      (launch, listing, statistics, model, first batch, one step) and its peak RSS;
#   3. the same for STEPS steps (default 30): peak RSS, img/s and the share of training
#      time spent waiting for batches (summary.json, data_wait_fraction).
# Writes bench/results/folder-<cpu|card>.md. About 2 minutes on 2 cores, plus 35 s to build DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python}"
DIR="${1:-/tmp/densekit-photos}"
STEPS="${STEPS:-30}"
WORK="$(mktemp -d)"
made=0
cleanup() { rm -rf "$WORK"; [ "$made" = 1 ] && rm -rf "$DIR"; }
trap cleanup EXIT

if [ ! -d "$DIR" ]; then
  "$PY" bench/photo_folder.py "$DIR" || exit 1
  made=1
fi
ENV_LINE="$("$PY" -c 'from densekit.bench.env import environment; from densekit.bench.report import environment_line; print(environment_line(environment()))')"
SLUG="$("$PY" -c 'from densekit.bench.env import environment, card_slug; import torch; print(card_slug(environment(), ["cuda"] if torch.cuda.is_available() else ["cpu"]))')"
MD="bench/results/folder-$SLUG.md"

echo "== loader alone" >&2
LOADER="$("$PY" bench/loader_speed.py "$DIR" --image-size 224 --workers 2 --batch-size 32 --batches 60)" || exit 1

train() {  # train STEPS OUT: /usr/bin/time -v of densekit train; prints "wall_s max_rss_kib"
  /usr/bin/time -v -o "$WORK/time-$1" "$PY" -m densekit train --dataset imagefolder --data-dir "$DIR" \
    --model densenet121 --image-size 224 --batch-size 16 --workers 2 --max-steps "$1" --no-progress \
    --out "$2" >"$WORK/log-$1" 2>&1 || { cat "$WORK/log-$1" >&2; exit 1; }
  "$PY" - "$WORK/time-$1" <<'PYEOF'
import re, sys
t = open(sys.argv[1]).read()
h, m, s = (["0"] + re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1).split(":"))[-3:]
print(round(int(h) * 3600 + int(m) * 60 + float(s), 1), re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
PYEOF
}
echo "== densenet121, 1 step" >&2
read -r ONE_WALL ONE_RSS < <(train 1 "$WORK/one")
echo "== densenet121, $STEPS steps" >&2
read -r RUN_WALL RUN_RSS < <(train "$STEPS" "$WORK/run")

"$PY" - "$LOADER" "$WORK/run/summary.json" "$ONE_WALL" "$ONE_RSS" "$RUN_WALL" "$RUN_RSS" "$STEPS" "$DIR" \
  "$ENV_LINE" "$MD" <<'PYEOF'
import json, sys
loader, summary = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
one_wall, one_rss, run_wall, run_rss, steps, data_dir, env, md = sys.argv[3:]
mib = lambda kib: f"{int(kib) / 1024:,.0f} MiB"
rows = [
    ("loader alone: decode + augment to 224 px, 2 workers, batch 32", f"{loader['images_per_second']:.0f} img/s",
     f"python bench/loader_speed.py DIR --image-size 224 --workers 2 --batch-size 32 --batches 60"),
    ("listing the folder (headers) + statistics (500-image sample)", f"{loader['listing_seconds']:.1f} s", "same"),
    ("densenet121, 224 px, batch 16: whole command for one step (launch to exit)", f"{one_wall} s, peak RSS {mib(one_rss)}",
     "/usr/bin/time -v densekit train --dataset imagefolder --data-dir DIR --model densenet121 --image-size 224 "
     "--batch-size 16 --workers 2 --max-steps 1"),
    (f"the same, {steps} steps: peak RSS", mib(run_rss), f"same, --max-steps {steps}"),
    (f"the same: training speed; time waiting for batches", f"{summary['images_per_second']:.2f} img/s; "
     f"{100 * summary['data_wait_fraction']:.1f}% of training time", "summary.json: images_per_second, data_wait_fraction"),
]
text = [f"Measured on: {env}", "", f"Folder: {loader['train_images']} training images (+ the validation split), "
        "JPEG, 256-384 px, from Fashion-MNIST (bench/photo_folder.py); streamed: " + str(loader["streaming"]), "",
        "| what | figure | command |", "|---|---|---|"] + [f"| {a} | {b} | {c if c == 'same' else f'`{c}`'} |" for a, b, c in rows]
open(md, "w").write("\n".join(text) + "\n")
print("\n".join(text))
PYEOF
