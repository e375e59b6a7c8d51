#!/usr/bin/env bash
# Held-out passkey grid: full attention vs a learned pattern vs a second pattern vs random heads vs all-streaming, at
# 25% and 50% retrieval heads. Flags given to this script override the defaults below; --help lists all.
# Example: scripts/run_passkey_grid.sh --pattern attn_patterns/SmolLM2-135M-Instruct/<setting> \
#              --baseline-pattern attn_patterns/smollm2-score --device cuda --dtype bfloat16
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m duo_attn.eval.passkey_grid \
    --contexts 1024 2048 4096 --depths 0.1 0.3 0.5 0.7 0.9 --keys-per-cell 3 --retrieval-fractions 0.25 0.5 \
    --output-dir runs/passkey_grid \
    "$@"
