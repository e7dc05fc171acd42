#!/usr/bin/env bash
# Does MTA help? The study on the papers' protocol, driven the way users drive mta (every step is an mta
# command; benchmarks/quality_study.py says which, and computes the paired intervals).
#
#   bash examples/quality_study.sh              # CPU preset: the 2-core machine, see the README for its wall time
#   bash examples/quality_study.sh --preset gpu # all Dolly train records, longer training, 500 dev prompts, 5 seeds
#   bash examples/quality_study.sh --main-only  # only the three-seed rows (SFT, srkl, srkl + MTA) and the references
#   bash examples/quality_study.sh --pilot      # only the student choice (SFT students of several sizes)
#
# Stage 0 fine-tunes the SmolLM2-135M-Instruct teacher on Dolly train (SFT) and extracts it once; every
# student starts from the same depth-pruned copy of the fine-tuned teacher. Re-running after an
# interruption continues where it stopped; everything goes to study-<preset>/ (kept out of git). The table
# is written to benchmarks/results/quality_<preset>.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m benchmarks.quality_study "$@"
