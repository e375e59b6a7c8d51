#!/usr/bin/env bash
# The Qwen2.5-Coder-0.5B-Instruct GPU plan (docs/qwen.md): python -m duo_attn.qwen_gpu {prepare,train,eval} "$@"
# (--help lists the flags). Keeps the converted model in $DUO_ATTN_CACHE (default /tmp/duo_attn_cache, which lives
# as long as the machine) and, when `gguf` is missing (only prepare needs it), installs it from a carried wheel in
# $DUO_ATTN_WHEELS (default .carry/wheels) into /tmp/site.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export DUO_ATTN_CACHE="${DUO_ATTN_CACHE:-/tmp/duo_attn_cache}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
wheels="${DUO_ATTN_WHEELS:-$REPO/.carry/wheels}"
if ! "$PY" -c "import gguf" 2>/dev/null && compgen -G "$wheels/gguf-*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/gguf-*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
exec "$PY" -m duo_attn.qwen_gpu "$@"
