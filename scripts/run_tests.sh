#!/usr/bin/env bash
# Install into ./.venv (see setup_env.sh) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup_env.sh"
cd "$root"
python -c 'import torch, transformers; print("testing with torch", torch.__version__, "and transformers", transformers.__version__)'
python -m pytest -q "$@"
