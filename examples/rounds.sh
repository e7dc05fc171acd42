#!/usr/bin/env bash
# Rounds of distillation on student-generated responses, offline: in each round the current student
# answers the training prompts (mta generate), the teacher is run once on those answers (mta extract), and
# the next student trains from the caches (mta train). Every step resumes: re-running after an
# interruption continues where it stopped, and finished steps are kept.
#
#   bash examples/rounds.sh [distillm|distillm2] [ROUNDS]
#
# distillm:  DistiLLM's recipe (skew forward KL, no CE) on the dataset's responses and the student's,
#            the student's share of batches raised adaptively from the dev loss (--student-data adaptive).
# distillm2: DistiLLM-2's contrastive loss on the teacher's responses and the student's.
# Environment: MTA_FLAGS (extra train flags, e.g. "--mta"), TEACHER (a model; default SmolLM2-135M-Instruct
# from PyPI), DATA / DEV (JSONL), KEEP_LAYERS (8), STEPS (train steps per round, 20), NEW_TOKENS (64),
# MTA_ROUNDS_DIR (rounds/).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-distillm}
ROUNDS=${2:-2}
case "$METHOD" in distillm|distillm2) ;; *) echo "usage: $0 [distillm|distillm2] [ROUNDS]" >&2; exit 2 ;; esac
MTA=${MTA:-.venv/bin/mta}
WORK=${MTA_ROUNDS_DIR:-rounds}/$METHOD
DATA=${DATA:-examples/instructions.jsonl}
DEV=${DEV:-examples/heldout.jsonl}
KEEP_LAYERS=${KEEP_LAYERS:-8}
STEPS=${STEPS:-20}
NEW_TOKENS=${NEW_TOKENS:-64}
LENGTHS=(--max-length 256 --max-prompt-length 128)
mkdir -p "$WORK"
TEACHER=${TEACHER:-$(bash scripts/fetch_teacher.sh "${MTA_ROUNDS_DIR:-rounds}/models")}

# once: the dataset's responses and the dev data through the teacher
$MTA extract --teacher "$TEACHER" --data "$DATA" --out "$WORK/data.zarr" "${LENGTHS[@]}"
$MTA extract --teacher "$TEACHER" --data "$DEV" --out "$WORK/dev.zarr" "${LENGTHS[@]}"
if [ "$METHOD" = distillm2 ]; then  # the teacher's own responses, once
    $MTA generate --model "$TEACHER" --data "$DATA" --out "$WORK/teacher.jsonl" --max-new-tokens "$NEW_TOKENS"
    $MTA extract --teacher "$TEACHER" --data "$WORK/teacher.jsonl" --out "$WORK/teacher.zarr" "${LENGTHS[@]}"
fi

# round 0: the untrained depth-pruned student
[ -f "$WORK/round-0/config.json" ] || $MTA prune --teacher "$TEACHER" --keep-layers "$KEEP_LAYERS" --out "$WORK/round-0"

student_of() { [ "$1" = 0 ] && echo "$WORK/round-0" || echo "$WORK/round-$1/student"; }
for round in $(seq 1 "$ROUNDS"); do
    previous=$(student_of $((round - 1)))
    here="$WORK/round-$round"
    mkdir -p "$here"
    $MTA generate --model "$previous" --data "$DATA" --out "$here/student.jsonl" --max-new-tokens "$NEW_TOKENS" \
        --seeds "$round"
    $MTA extract --teacher "$TEACHER" --data "$here/student.jsonl" --out "$here/student.zarr" "${LENGTHS[@]}"
    if [ "$METHOD" = distillm ]; then
        objective=(--recipe distillm --cache "$WORK/data.zarr" --cache "$here/student.zarr"
                   --student-data adaptive --dev-cache "$WORK/dev.zarr" --eval-every 5)
    else
        objective=(--loss distillm2 --cache "$WORK/teacher.zarr" --cache "$here/student.zarr")
    fi
    # shellcheck disable=SC2086  # MTA_FLAGS holds several flags
    $MTA train --student "$previous" "${objective[@]}" --max-steps "$STEPS" --batch-size 4 \
        --out "$here/student" --resume ${MTA_FLAGS:-}
done

$MTA eval --model "$WORK/round-0" --model "$(student_of "$ROUNDS")" --data "$DEV" --seeds 10 \
    --max-new-tokens "$NEW_TOKENS" --json "$WORK/eval.json"
