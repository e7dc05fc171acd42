#!/usr/bin/env bash
# Create .venv and install mta with its test, spaCy-model and tensorboard extras, at the exact versions of
# requirements.lock (again only when pyproject.toml or the lock changed). torch is pinned first to the
# CPU build so that no multi-GB CUDA wheel is pulled in; MTA_NO_LOCK=1 installs from the open ranges of
# pyproject.toml instead (a platform the lock does not fit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.mta-installed
WANT=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)-${MTA_NO_LOCK:-0}
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && exit 0
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${MTA_TORCH_VERSION:-2.13.0}"
if [ "${MTA_NO_LOCK:-0}" = 1 ]; then
    .venv/bin/python -m pip install -q -e ".[dev,spacy-model,tensorboard]"
else
    .venv/bin/python -m pip install -q -r requirements.lock
    .venv/bin/python -m pip install -q --no-deps -e .
fi
echo "$WANT" > "$STAMP"
