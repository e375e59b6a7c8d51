#!/usr/bin/env bash
# Training-free head scores (attention mass of the answer queries outside each head's sink + recent window).
# Flags given to this script override the defaults below; --help lists all.
# Example: scripts/run_score.sh --model smollm2 --num-samples 8 --output-dir attn_patterns/smollm2-score
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m duo_attn.learn.scoring \
    --sink-size 64 --recent-size 256 --num-samples 4 --num-passkeys 10 \
    "$@"
