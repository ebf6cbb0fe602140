#!/usr/bin/env bash
# Transfer learning and multi-label training on real Fashion-MNIST images: the figures of
# docs/performance.md#transfer-learning, on this machine's cores.
#
#   bash bench/transfer.sh [WORK]
#
# WORK (default: a new temporary folder, removed at the end) receives the data sets
# (bench/transfer_data.py) and the runs:
#   1. the source: `make run`'s model and recipe (densenet_bc_40_k12_s2, 3 epochs) on Fashion-MNIST;
#   2. multi-label transfer, the CheXNet pattern: 2x2 mosaics (56 px, labels = the classes shown) in
#      ChestX-ray14's CSV layout; 1,000 training mosaics from the source's weights against the same
#      training from scratch, then 12,000 from the source's weights (mean test AUROC);
#   3. a linear probe: a run on classes 0-4 only, then its frozen backbone with a new head trained on
#      500 labelled images of classes 5-9 (test accuracy on all 5,000 test images of 5-9);
#   4. a torchvision densenet121 state dict (seeded, torch.save) fine-tuned with a 7-class head at
#      224 px on 70 JPEGs, then predict on one.
# Writes bench/results/transfer-<cpu|card>.md. About 20 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
if [ -n "${1:-}" ]; then W="$1"; mkdir -p "$W"; else W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT; fi
CSV=(--dataset csv --train-csv train.csv --val-csv val.csv --test-csv test.csv --path-column "Image Index"
     --label-column "Finding Labels" --label-sep "|" --multi-label --image-size 56 --epochs 3 --no-progress)
start=$SECONDS

echo "== data" >&2
[ -d "$W/mos1k" ] || "$PY" bench/transfer_data.py mosaics "$W/mos1k" --train 1000 --val 500 --test 2000 >&2 || exit 1
[ -d "$W/mos12k" ] || "$PY" bench/transfer_data.py mosaics "$W/mos12k" --train 12000 --val 1000 --test 2000 >&2 || exit 1
[ -d "$W/c04" ] || "$PY" bench/transfer_data.py split-classes "$W/c04" --classes 0-4 --test-all >&2 || exit 1
[ -d "$W/c59" ] || "$PY" bench/transfer_data.py split-classes "$W/c59" --classes 5-9 --train 500 --test-all >&2 || exit 1
[ -d "$W/photos" ] || "$PY" bench/transfer_data.py photos "$W/photos" --classes 7 --train 70 --test 35 >&2 || exit 1

echo "== source: make run's model on Fashion-MNIST" >&2
[ -f "$W/source/summary.json" ] || "${DK[@]}" train --model densenet_bc_40_k12_s2 --epochs 3 --out "$W/source" --no-progress >&2 || exit 1
echo "== 1,000 mosaics: pretrained, then from scratch" >&2
"${DK[@]}" train --pretrained "$W/source" --data-dir "$W/mos1k" "${CSV[@]}" --out "$W/mos1k-pretrained" >&2 || exit 1
"${DK[@]}" train --model densenet_bc_40_k12_s2 --recipe finetune --data-dir "$W/mos1k" "${CSV[@]}" --out "$W/mos1k-scratch" >&2 || exit 1
echo "== 12,000 mosaics: pretrained" >&2
"${DK[@]}" train --pretrained "$W/source" --data-dir "$W/mos12k" "${CSV[@]}" --out "$W/mos12k-pretrained" >&2 || exit 1
echo "== linear probe: classes 0-4, then a frozen backbone on 500 images of 5-9" >&2
"${DK[@]}" train --dataset imagefolder --data-dir "$W/c04" --model densenet_bc_40_k12_s2 --image-size 28 --epochs 3 --out "$W/c04-run" --no-progress >&2 || exit 1
"${DK[@]}" train --pretrained "$W/c04-run" --dataset imagefolder --data-dir "$W/c59" --freeze-backbone --out "$W/c59-probe" --no-progress >&2 || exit 1
echo "== a torchvision densenet121 file, 7 classes, 224 px" >&2
"$PY" -c 'import torch, torchvision, sys; torch.manual_seed(0); torch.save(torchvision.models.densenet121().state_dict(), sys.argv[1])' "$W/densenet121-seeded.pth" || exit 1
/usr/bin/time -v -o "$W/time-tv" "${DK[@]}" train --pretrained "$W/densenet121-seeded.pth" --dataset imagefolder --data-dir "$W/photos" --epochs 1 --batch-size 8 --out "$W/tv121" --no-progress >&2 || exit 1
JPEG="$(find "$W/photos/test" -name '*.jpg' | sort | head -1)"
PRED="$("${DK[@]}" predict "$W/tv121" "$JPEG")" || exit 1

ENV_LINE="$(env_line)"
SLUG="$(result_slug)"
MD="bench/results/transfer-$SLUG.md"
read -r SRC_ACC < <(summary "$W/source/summary.json" test_accuracy)
read -r P1 P1E P1S < <(summary "$W/mos1k-pretrained/summary.json" test_auroc kept_epoch train_seconds)
read -r S1 S1E S1S < <(summary "$W/mos1k-scratch/summary.json" test_auroc kept_epoch train_seconds)
read -r P12 P12E P12S < <(summary "$W/mos12k-pretrained/summary.json" test_auroc kept_epoch train_seconds)
read -r C04 < <(summary "$W/c04-run/summary.json" test_accuracy)
read -r PROBE PROBEE < <(summary "$W/c59-probe/summary.json" test_accuracy kept_epoch)
read -r TVN TVNEW < <("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); p=s["pretrained"]; print(len(p["loaded"]), ",".join(p["new"]))' "$W/tv121/summary.json")
WALL="$(grep 'Elapsed (wall' "$W/time-tv" | awk '{print $NF}')"
{
  echo "Measured on: $ENV_LINE"
  echo
  echo "| what | figure | goal |"
  echo "|---|---|---|"
  echo "| source: densenet_bc_40_k12_s2, Fashion-MNIST, 3 epochs | test accuracy $SRC_ACC | |"
  echo "| 1,000 mosaics (56 px, multi-label), 3 epochs: --pretrained source | mean test AUROC $P1 (kept epoch $P1E, ${P1S%.*} s) | >= scratch + 0.10 |"
  echo "| the same from scratch (--recipe finetune) | mean test AUROC $S1 (kept epoch $S1E, ${S1S%.*} s) | |"
  echo "| 12,000 mosaics, 3 epochs: --pretrained source | mean test AUROC $P12 (kept epoch $P12E, ${P12S%.*} s) | >= 0.97 |"
  echo "| classes 0-4 only, 3 epochs (the probe's source) | test accuracy $C04 on classes 0-4 | |"
  echo "| its frozen backbone, new head on 500 images of classes 5-9 (--freeze-backbone: the probe recipe) | test accuracy $PROBE on classes 5-9 (kept epoch $PROBEE) | >= 0.90 |"
  echo "| seeded torchvision densenet121 file, 7 classes, 224 px, 1 epoch | $TVN tensors loaded, new: $TVNEW; whole command ${WALL} | runs, predicts |"
  echo
  echo "predict on $(basename "$JPEG"): \`$PRED\`"
} > "$MD"
cat "$MD"
echo "wrote $MD in $((SECONDS - start)) s" >&2
