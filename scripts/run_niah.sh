#!/usr/bin/env bash
# Needle-in-a-haystack grid (context length x depth) on SmolLM2 by default. Flags given to this script override the
# defaults below; --help lists all.
# Example: scripts/run_niah.sh --pattern attn_patterns/SmolLM2-135M-Instruct/<setting> --sparsities 0.25 0.5 0.75
#          scripts/run_niah.sh --device cuda --dtype bfloat16 --contexts 1024 2048 4096 --output-dir runs/niah-gpu
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m duo_attn.eval.niah \
    --contexts 512 1024 2048 --depths 0 0.25 0.5 0.75 1 --output-dir runs/niah \
    "$@"
