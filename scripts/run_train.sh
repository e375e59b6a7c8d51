#!/usr/bin/env bash
# Learn DuoAttention gates with the paper's settings (AdamW lr 0.02, L1 weight 0.05, 2000 steps, recent 256,
# 10 passkeys) and sink 64, the shipped SmolLM2 patterns' window (the paper used 128 for 7-8B models). Flags given to
# this script come later and override them; --help lists all.
# Example: scripts/run_train.sh --model smollm2 --context-length-max 4096 --output-dir attn_patterns/smollm2
# Data-parallel on the 8 GPUs of one machine, through torchrun:
#   NPROC_PER_NODE=8 scripts/run_train.sh --grad-accum-steps 8 ...
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
LAUNCH=("${PYTHON:-python3}")
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    LAUNCH+=(-m torch.distributed.run --standalone --nproc-per-node "${NPROC_PER_NODE}")
fi
exec "${LAUNCH[@]}" -m duo_attn.learn.train \
    --lr 0.02 --reg-weight 0.05 --num-steps 2000 --warmup-ratio 0.1 \
    --sink-size 64 --recent-size 256 --num-passkeys 10 \
    "$@"
