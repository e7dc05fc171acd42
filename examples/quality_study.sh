#!/usr/bin/env bash
# Does MTA help? The paper's ranking at small scale, driven the way users drive mta.
#
#   bash examples/quality_study.sh              # CPU scale: about 45 minutes on 2 cores
#   bash examples/quality_study.sh --scale gpu  # more records, layers, epochs and seeds, on CUDA
#
# One extraction of the SmolLM2-135M-Instruct teacher over Dolly train records; six students from
# that cache with the same budget and seed (sft, fkl, srkl, srkl + MTA, srkl + DSA only, srkl + Hid
# only); evaluation of the teacher, the untrained pruned student and every trained student on held-out
# Dolly dev records over several sampling seeds. The table goes to benchmarks/results/quality.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=cpu
if [ "${1:-}" = "--scale" ]; then SCALE=${2:?--scale takes cpu or gpu}; fi
case "$SCALE" in
  cpu) TRAIN=400 EVAL=50 KEEP=8 EPOCHS=2 SEEDS=10,20 NEW_TOKENS=96 BATCH=8 DEVICE=cpu ;;
  gpu) TRAIN=2600 EVAL=500 KEEP=12 EPOCHS=3 SEEDS=10,20,30,40,50 NEW_TOKENS=256 BATCH=16 DEVICE=cuda ;;
  *) echo "--scale must be cpu or gpu, got $SCALE" >&2; exit 2 ;;
esac
DATA=${MTA_DOLLY:-../shared/data/dolly}
WORK=${MTA_STUDY_DIR:-study-$SCALE}
LR=${MTA_STUDY_LR:-2e-4}

bash scripts/setup.sh
MTA=.venv/bin/mta
mkdir -p "$WORK/students"
TEACHER=$(bash scripts/fetch_teacher.sh "$WORK/models")
head -n "$TRAIN" "$DATA/train.jsonl" > "$WORK/train.jsonl"
head -n "$EVAL" "$DATA/dev.jsonl" > "$WORK/dev.jsonl"

$MTA extract --teacher "$TEACHER" --data "$WORK/train.jsonl" --out "$WORK/cache.zarr" \
    --max-length 256 --max-prompt-length 128 --device "$DEVICE"
[ -f "$WORK/students/pruned/config.json" ] || $MTA prune --teacher "$TEACHER" --keep-layers "$KEEP" --out "$WORK/students/pruned"

VARIANTS=("sft:--loss sft" "fkl:--loss fkl" "srkl:--loss srkl" "srkl+mta:--loss srkl --mta"
          "srkl+dsa:--loss srkl --mta --no-hid" "srkl+hid:--loss srkl --mta --no-dsa")
MODELS=(--model "$TEACHER" --model "$WORK/students/pruned")
for variant in "${VARIANTS[@]}"; do
  name=${variant%%:*}
  # shellcheck disable=SC2086 # the flags are meant to split
  $MTA train --cache "$WORK/cache.zarr" --init-from-teacher --keep-layers "$KEEP" ${variant#*:} \
      --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --seed 0 --device "$DEVICE" \
      --checkpoint-every 50 --resume --out "$WORK/students/$name" > /dev/null
  MODELS+=(--model "$WORK/students/$name")
done

$MTA eval "${MODELS[@]}" --data "$WORK/dev.jsonl" --seeds "$SEEDS" --max-new-tokens "$NEW_TOKENS" \
    --batch-size "$BATCH" --device "$DEVICE" --cache "$WORK/cache.zarr" --json "$WORK/eval.json"
.venv/bin/python -m benchmarks.quality_table "$WORK/eval.json" --scale "$SCALE" \
    --settings "train=$TRAIN eval=$EVAL keep_layers=$KEEP epochs=$EPOCHS seeds=$SEEDS new_tokens=$NEW_TOKENS lr=$LR"
