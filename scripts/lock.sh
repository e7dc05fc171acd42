#!/usr/bin/env bash
# Regenerate requirements.lock: the exact version of every dependency except torch (scripts/setup.sh pins
# torch itself, so that each machine keeps its own CPU or CUDA build), resolved by uv for Python 3.11 on
# Linux x86_64 against torch's CPU build (whose dependencies hold no CUDA libraries). The extras locked are
# those the tests need (dev, spacy-model, tensorboard); wandb stays an install of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${MTA_TORCH_VERSION:-2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q uv
echo "torch==$TORCH" > "$work/torch.txt"
if [ -d /opt/wheels ]; then
    source=(--find-links /opt/wheels)          # a local copy of the CPU wheel
else
    source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$work/venv/bin/uv" pip compile pyproject.toml --extra dev --extra spacy-model --extra tensorboard --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 "${source[@]}" --override "$work/torch.txt" --no-emit-package torch \
    --no-header -o requirements.lock > /dev/null
sed -i '1i # Exact versions for scripts/setup.sh and CI; regenerate with scripts/lock.sh (torch is pinned by setup.sh).' \
    requirements.lock
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) packages" >&2
