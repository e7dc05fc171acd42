#!/usr/bin/env bash
# Does MTA help? The paper's ranking at small scale, driven the way users drive mta.
#
#   bash examples/quality_study.sh              # CPU scale: about 45 minutes on 2 cores
#   bash examples/quality_study.sh --scale gpu  # more records, layers, epochs and seeds, on CUDA
#
# One extraction of the SmolLM2-135M-Instruct teacher over Dolly train records; six students from
# that cache with the same budget and seed (sft, fkl, srkl, srkl + MTA, srkl + DSA only, srkl + Hid
# only); evaluation of the teacher, the untrained pruned student and every trained student on held-out
# Dolly dev records over several sampling seeds. The settings are recipes: examples/recipes/quality-<scale>.toml
# (extract, train budget, eval) and one recipe per variant. The table goes to
# benchmarks/results/quality_<scale>.{md,json}, the pictures to <work>/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=cpu
if [ "${1:-}" = "--scale" ]; then SCALE=${2:?--scale takes cpu or gpu}; fi
case "$SCALE" in
  cpu) TRAIN=400 EVAL=50 ;;
  gpu) TRAIN=2600 EVAL=500 ;;
  *) echo "--scale must be cpu or gpu, got $SCALE" >&2; exit 2 ;;
esac
DATA=${MTA_DOLLY:-../shared/data/dolly}
WORK=${MTA_STUDY_DIR:-study-$SCALE}
RECIPES=examples/recipes
STUDY=$RECIPES/quality-$SCALE.toml
LR=(${MTA_STUDY_LR:+--lr "$MTA_STUDY_LR"})  # overrides the recipe's learning rate when set

bash scripts/setup.sh
MTA=.venv/bin/mta
KEEP=$(.venv/bin/python -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["train"]["keep-layers"])' "$STUDY")
mkdir -p "$WORK/students"
TEACHER=$(bash scripts/fetch_teacher.sh "$WORK/models")
head -n "$TRAIN" "$DATA/train.jsonl" > "$WORK/train.jsonl"
head -n "$EVAL" "$DATA/dev.jsonl" > "$WORK/dev.jsonl"

$MTA extract --config "$STUDY" --teacher "$TEACHER" --data "$WORK/train.jsonl" --out "$WORK/cache.zarr"
[ -f "$WORK/students/pruned/config.json" ] || $MTA prune --teacher "$TEACHER" --keep-layers "$KEEP" --out "$WORK/students/pruned"

VARIANTS=("sft:sft" "fkl:fkl" "srkl:srkl" "srkl+mta:srkl-mta" "srkl+dsa:srkl-dsa" "srkl+hid:srkl-hid")  # name:recipe
MODELS=(--model "teacher=$TEACHER" --model "pruned=$WORK/students/pruned")
RUNS=()
for variant in "${VARIANTS[@]}"; do
  name=${variant%%:*}
  $MTA train --config "$STUDY" --config "$RECIPES/${variant#*:}.toml" "${LR[@]}" --cache "$WORK/cache.zarr" \
      --out "$WORK/students/$name" > /dev/null
  MODELS+=(--model "$name=$WORK/students/$name")
  RUNS+=("$WORK/students/$name")
done

$MTA eval --config "$STUDY" "${MODELS[@]}" --data "$WORK/dev.jsonl" --cache "$WORK/cache.zarr" --json "$WORK/eval.json"
.venv/bin/python -m benchmarks.quality_table "$WORK/eval.json" --scale "$SCALE" \
    --settings "train=$TRAIN eval=$EVAL recipe=$STUDY${MTA_STUDY_LR:+ lr=$MTA_STUDY_LR}"
$MTA report "${RUNS[@]}" "$WORK/eval.json" "$WORK/cache.zarr" --title "Quality study ($SCALE)" \
    --out "$WORK/report.html" > /dev/null
echo "report: $WORK/report.html" >&2
