#!/usr/bin/env bash
# Thin wrapper: python -m duo_attn.bench_kv_quant "$@" (--help lists the flags; docs/kv_quant.md the commands).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m duo_attn.bench_kv_quant "$@"
