#!/usr/bin/env bash
# The README's main job: install into ./.venv (see setup_env.sh), then answer a few ~1K-token passkey prompts on
# SmolLM2-135M-Instruct with full attention and with DuoAttention, side by side. Flags go to the demo; --help lists all.
# Example: scripts/run_demo.sh --pattern attn_patterns/SmolLM2-135M-Instruct/<setting> --sparsity 0.5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup_env.sh"
cd "$root"
exec python -m duo_attn.demo "$@"
