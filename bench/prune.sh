#!/usr/bin/env bash
# Pruning that pays, on Fashion-MNIST: the figures of docs/performance.md#pruning, on this
# machine's cores.
#
#   bash bench/prune.sh [WORK]
#
# WORK (default: a new temporary folder, removed at the end) receives the runs:
#   1. `make run`'s model and recipe (densenet_bc_40_k12_s2, 3 epochs), with and without
#      sparsity training (--sparsity $LAMBDA, network slimming's L1 on the batch-norm scales);
#   2. each pruned by $AMOUNT (densekit prune: params, MACs, accuracy, measured speed), then
#      fine-tuned for $FT_EPOCHS epochs at lr $FT_LR (train --init);
#   3. the speed of each pruned model against its parent, in PyTorch and in onnxruntime
#      (bench/prune_speed.py: batch 64, alternating rounds, medians).
# Writes bench/results/prune-<cpu|card>.md. About 20 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
if [ -n "${1:-}" ]; then W="$1"; mkdir -p "$W"; else W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT; fi
LAMBDA="${LAMBDA:-1e-4}"
AMOUNT="${AMOUNT:-0.4}"
FT_EPOCHS="${FT_EPOCHS:-2}"
FT_LR="${FT_LR:-0.02}"
start=$SECONDS

for kind in plain sparse; do
  extra=(); [ "$kind" = sparse ] && extra=(--sparsity "$LAMBDA")
  [ -f "$W/$kind/summary.json" ] || "${DK[@]}" train --model densenet_bc_40_k12_s2 --epochs 3 ${extra[@]+"${extra[@]}"} \
      --out "$W/$kind" --no-progress >&2 || exit 1
  [ -f "$W/$kind-p/summary.json" ] || "${DK[@]}" prune "$W/$kind" --amount "$AMOUNT" --out "$W/$kind-p" >&2 || exit 1
  [ -f "$W/$kind-ft/summary.json" ] || "${DK[@]}" train --init "$W/$kind-p" --epochs "$FT_EPOCHS" --lr "$FT_LR" \
      --out "$W/$kind-ft" --no-progress >&2 || exit 1
  "$PY" bench/prune_speed.py "$W/$kind" "$W/$kind-ft" > "$W/$kind-speed.json" || exit 1
done

ENV_LINE="$(env_line)"
SLUG="$(result_slug)"
MD="bench/results/prune-$SLUG.md"
{
  echo "Measured on: $ENV_LINE"
  echo
  echo "densenet_bc_40_k12_s2, Fashion-MNIST, 3 epochs of the fast recipe; pruned by $AMOUNT of the prunable channels;"
  echo "fine-tuned $FT_EPOCHS epochs at lr $FT_LR. Speed: batch 64, $(summary "$W/plain-speed.json" threads) threads, median of alternating rounds."
  echo
  echo "| training | test acc. unpruned | params | MACs | test acc. pruned, before fine-tuning | after fine-tuning | PyTorch speedup | onnxruntime speedup |"
  echo "|---|---|---|---|---|---|---|---|"
  for kind in plain sparse; do
    read -r ACC SP < <(summary "$W/$kind/summary.json" test_accuracy sparsity)
    read -r PR MR BEFORE < <(summary "$W/$kind-p/summary.json" params_ratio macs_ratio test_accuracy_after)
    read -r FT < <(summary "$W/$kind-ft/summary.json" test_accuracy)
    read -r TS OS < <(summary "$W/$kind-speed.json" torch_speedup onnx_speedup)
    printf '| --sparsity %s | %.4f | %.3fx | %.3fx | %.4f | %.4f | %.2fx | %.2fx |\n' "$SP" "$ACC" "$PR" "$MR" "$BEFORE" "$FT" "$TS" "$OS"
  done
} > "$MD"
cat "$MD"
echo "wrote $MD in $((SECONDS - start)) s" >&2
