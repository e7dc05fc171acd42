#!/usr/bin/env bash
# Create .venv and install mta with its test and spaCy-model extras (again only when pyproject.toml
# changed). torch is pinned first to the CPU build so that no multi-GB CUDA wheel is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.mta-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && exit 0
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${MTA_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,spacy-model]"
echo "$WANT" > "$STAMP"
