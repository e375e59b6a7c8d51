"""Training-free head scores: how much attention the answer queries put outside each head's sink + recent window.

A head whose answer-producing queries read far-away context (beyond the attention sinks and the recent window)
would lose that information as a streaming head, so it should keep full attention. The score of a KV head is the
attention mass its query heads put on such keys, averaged over the GQA group, the supervised (answer) queries and
the samples, then divided by the largest score so the table lies in [0, 1] like learned gates. Only the answer
queries' attention rows are formed, never the full ``L x L`` probabilities.
Run ``python -m duo_attn.learn.scoring --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..masks import allowed_keys
from ..patch import InstalledAttention
from ..patterns import save_attn_pattern
from .run import (
    HEATMAP_FILE,
    LoadedModel,
    PasskeyRunConfig,
    add_passkey_run_flags,
    install_shared_attention,
    run_provenance,
    save_gate_heatmap,
    supervised_query_mask,
    whole_sequence_attention,
)

SCORE_ATTENTION = "duo_attn_score"
RAW_SCORES_FILE = "raw_scores.tsv"


def tail_attention_probs(
    query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """Causal attention probabilities ``[B, H, T, K]`` (fp32) of the ``T`` queries ``[B, H, T, D]`` at
    ``query_positions [T]`` over keys ``[B, H_kv, K, D]`` at positions 0..K-1."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    future = torch.arange(key.shape[2], device=key.device)[None, :] > query_positions[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def far_attention_mass(
    probs: torch.Tensor, query_positions: torch.Tensor, num_kv_heads: int, sink_size: int, recent_size: int
) -> torch.Tensor:
    """Attention mass ``[B, H_kv]`` on keys a streaming head could not see, averaged over each KV head's query heads
    and over the ``T`` queries. ``probs`` is ``[B, H, T, K]`` over key positions 0..K-1."""
    batch, heads, _, length = probs.shape
    key_positions = torch.arange(length, device=probs.device)[None]
    causal = allowed_keys(query_positions[None], key_positions)[0, 0]
    near = allowed_keys(query_positions[None], key_positions, sink_size=sink_size, recent_size=recent_size)[0, 0]
    far = (probs * (causal & ~near)).sum(-1).mean(-1)  # [B, H]
    return far.view(batch, num_kv_heads, heads // num_kv_heads).mean(-1)


class ScoreRecorder:
    """Collects far-attention mass per (layer, KV head) while the model runs normally; shared by all layers."""

    def __init__(self, num_layers: int, num_kv_heads: int, sink_size: int, recent_size: int):
        self.sink_size, self.recent_size = sink_size, recent_size
        self.sums = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self.counts = torch.zeros(num_layers, 1, dtype=torch.float64)
        self.query_positions: torch.Tensor | None = None
        self.installed: InstalledAttention | None = None  # set by `attach_recorder`; `installed.uninstall()` undoes it

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Score one layer's attention for the current sample's answer queries."""
        positions = self.query_positions
        probs = tail_attention_probs(query[:, :, positions], key, positions, scaling)
        mass = far_attention_mass(probs, positions, key.shape[1], self.sink_size, self.recent_size)
        self.sums[layer] += mass.sum(0).double().cpu()
        self.counts[layer] += mass.shape[0]

    def scores(self) -> np.ndarray:
        """Mean far-attention mass ``[layers, kv_heads]`` over everything recorded."""
        if (self.counts == 0).any():
            raise RuntimeError("some layers recorded no attention; was the model run with the scoring attention?")
        return (self.sums / self.counts).numpy()


def scoring_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ordinary causal attention that also records the answer queries' far mass."""
    out = whole_sequence_attention(query, key, value, scaling)  # first: it refuses cached steps
    module.duo_score_recorder.add(module.layer_idx, query, key, scaling)
    return out.transpose(1, 2).contiguous(), None


def attach_recorder(model: PreTrainedModel, sink_size: int, recent_size: int) -> ScoreRecorder:
    """Switch ``model`` to the recording attention; returns the recorder to read scores from, whose
    ``installed.uninstall()`` restores the model's own attention."""
    config = model.config
    recorder = ScoreRecorder(config.num_hidden_layers, config.num_key_value_heads, sink_size, recent_size)
    recorder.installed = install_shared_attention(
        model, SCORE_ATTENTION, scoring_attention_forward, "duo_score_recorder", recorder
    )
    return recorder


def normalise_scores(raw: np.ndarray) -> np.ndarray:
    """Divide by the largest score so the table reads like gates in [0, 1]."""
    top = float(raw.max())
    if top <= 0.0:
        raise ValueError(
            "no head put attention outside the sink + recent window: the contexts are not longer than "
            "sink_size + recent_size, so they cannot tell retrieval heads from streaming heads"
        )
    return np.clip(raw / top, 0.0, 1.0)


@dataclasses.dataclass
class ScoreConfig(PasskeyRunConfig):
    """Every setting of a scoring run; all are CLI flags and all end up in config.json."""

    context_length_max: int = 2048
    context_length_intervals: int = 4
    num_samples: int = 4
    dir_infix: ClassVar[str] = "-score"


@torch.no_grad()
def score_heads(config: ScoreConfig, loaded: LoadedModel | None = None) -> Path:
    """Score every KV head on ``num_samples`` passkey samples and write the pattern directory + heatmap.
    ``loaded``: the model already loaded as ``config`` says (`PasskeyRunConfig.load_model`), else it is loaded."""
    if config.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {config.num_samples}")
    started = time.perf_counter()
    model, tokenizer, device, dtype = config.load_model() if loaded is None else loaded
    dataset = config.passkey_dataset(tokenizer, config.num_samples)
    recorder = attach_recorder(model, config.sink_size, config.recent_size)
    tokens = 0
    try:
        for index in tqdm(range(len(dataset)), desc="scoring heads", dynamic_ncols=True, file=sys.stderr):
            sample = dataset[index]
            recorder.query_positions = supervised_query_mask(sample.labels).nonzero()[:, 0].to(device)
            model.base_model(input_ids=sample.input_ids[None].to(device), use_cache=False)
            tokens += len(sample.input_ids)
    finally:
        recorder.installed.uninstall()
    raw = recorder.scores()
    scores = normalise_scores(raw)

    out = config.pattern_dir()
    info = {
        **dataclasses.asdict(config),
        "method": "duo_attn.learn.scoring (far attention mass of answer queries, divided by the max)",
        "raw_score_max": float(raw.max()),
        "raw_score_mean": float(raw.mean()),
        **run_provenance(model, device, dtype),
        "tokens_scored": tokens,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    info.pop("output_dir")
    save_attn_pattern(out, scores, config.sink_size, config.recent_size, info)
    np.savetxt(out / RAW_SCORES_FILE, raw, delimiter="\t")
    title = f"{Path(config.model).name} head scores (sink {config.sink_size}, recent {config.recent_size})"
    save_gate_heatmap(scores, out / HEATMAP_FILE, title)
    return out


def build_parser() -> argparse.ArgumentParser:
    """CLI flags mirror `ScoreConfig` one to one."""
    d = ScoreConfig()
    p = argparse.ArgumentParser(
        prog="duo-attn score",
        description="Score KV heads without training: attention mass of the passkey answers' queries outside each "
        "head's sink + recent window (1 = most retrieval-like). Writes a pattern directory usable like learned gates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_passkey_run_flags(d, p, p, p)
    p.add_argument("--output-dir", default=d.output_dir,
                   help="pattern directory (default attn_patterns/<model>-score-sink<S>-recent<R>)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="passkey samples to average over")
    p.add_argument("--seed", type=int, default=d.seed, help="data seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    config = ScoreConfig(**vars(build_parser().parse_args(argv)))
    out = score_heads(config)
    print(f"head scores written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
