#!/usr/bin/env bash
# Pruning that pays, on Fashion-MNIST: the figures of docs/performance.md#pruning, on this
# machine's cores.
#
#   bash bench/prune.sh [WORK]
#
# WORK (default: a new temporary folder, removed at the end) receives the runs:
#   1. `make run`'s model and recipe (densenet_bc_40_k12_s2, 3 epochs), with and without
#      sparsity training (--sparsity $LAMBDA, network slimming's L1 on the batch-norm scales);
#   2. each pruned by every amount in $AMOUNTS (densekit prune: params, MACs, accuracy, measured
#      speed), then fine-tuned for $FT_EPOCHS epochs at lr $FT_LR (train --init);
#   3. the speed of each pruned model against its parent, in PyTorch and in onnxruntime
#      (bench/prune_speed.py: batch 64, alternating rounds, medians).
# Writes bench/results/prune-<cpu|card>.md. About 25 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
if [ -n "${1:-}" ]; then W="$1"; mkdir -p "$W"; else W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT; fi
LAMBDA="${LAMBDA:-5e-4}"
AMOUNTS="${AMOUNTS:-0.2 0.4 0.6}"
FT_EPOCHS="${FT_EPOCHS:-2}"
# 0.05: of 0.02, 0.05 and 0.1 for the sparse run pruned by 0.4, the best validation accuracy
# (90.73%, 91.05%, 90.73%; docs/performance.md, "Pruning whole maps")
FT_LR="${FT_LR:-0.05}"
start=$SECONDS

for kind in plain sparse; do
  extra=(); [ "$kind" = sparse ] && extra=(--sparsity "$LAMBDA")
  [ -f "$W/$kind/summary.json" ] || "${DK[@]}" train --model densenet_bc_40_k12_s2 --epochs 3 ${extra[@]+"${extra[@]}"} \
      --out "$W/$kind" --no-progress >&2 || exit 1
  for a in $AMOUNTS; do
    p="$W/$kind-p$a"; ft="$W/$kind-ft$a"
    [ -f "$p/summary.json" ] || "${DK[@]}" prune "$W/$kind" --amount "$a" --out "$p" --no-speed >&2 || exit 1
    [ -f "$ft/summary.json" ] || "${DK[@]}" train --init "$p" --epochs "$FT_EPOCHS" --lr "$FT_LR" --out "$ft" \
        --no-progress >&2 || exit 1
    "$PY" bench/prune_speed.py "$W/$kind" "$ft" > "$W/$kind-speed$a.json" || exit 1
  done
done

ENV_LINE="$(env_line)"
SLUG="$(result_slug)"
MD="bench/results/prune-$SLUG.md"
{
  echo "Measured on: $ENV_LINE"
  echo
  echo "densenet_bc_40_k12_s2, Fashion-MNIST, 3 epochs of the fast recipe; pruned by each amount of the prunable"
  echo "channels; fine-tuned $FT_EPOCHS epochs at lr $FT_LR. Speed of the fine-tuned model against its parent: batch 64,"
  echo "$(summary "$W/plain-speed${AMOUNTS%% *}.json" threads) threads, median of alternating rounds."
  echo
  echo "| training | amount | test acc. unpruned | params | MACs | test acc. pruned, before fine-tuning | after fine-tuning | PyTorch speedup | onnxruntime speedup |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for kind in plain sparse; do
    read -r ACC SP < <(summary "$W/$kind/summary.json" test_accuracy sparsity)
    for a in $AMOUNTS; do
      read -r PR MR BEFORE < <(summary "$W/$kind-p$a/summary.json" params_ratio macs_ratio test_accuracy_after)
      read -r FT < <(summary "$W/$kind-ft$a/summary.json" test_accuracy)
      read -r TS OS < <(summary "$W/$kind-speed$a.json" torch_speedup onnx_speedup)
      printf '| --sparsity %s | %s | %.4f | %.3fx | %.3fx | %.4f | %.4f | %.2fx | %.2fx |\n' "$SP" "$a" "$ACC" "$PR" "$MR" "$BEFORE" "$FT" "$TS" "$OS"
    done
  done
} > "$MD"
cat "$MD"
echo "wrote $MD in $((SECONDS - start)) s" >&2
