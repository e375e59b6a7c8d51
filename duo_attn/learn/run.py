"""What a passkey run (training or head scoring) shares: its settings and flags, the model it loads, the attention
mode it installs on it, and what it writes next to the pattern (provenance, a heatmap of the gates)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import ModelError
from ..models import SMOLLM2, decoder_layers, load_model, load_tokenizer, resolve_device, resolve_dtype, tiny_model
from ..patch import InstalledAttention, install_attention
from ..patterns import atomic_path
from ..placement import head_shard
from .data import IGNORE_INDEX, PasskeyDataset
from .haystack import encode_haystack, load_haystack

HEATMAP_FILE = "gates.png"
TINY_PREFIX = "tiny-"
# What `PasskeyRunConfig.load_model` returns; a caller running several jobs on one model passes it on to each.
LoadedModel = tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.device, torch.dtype]


def supervised_query_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token prediction is supervised (``labels[p + 1] != -100``), as the LM loss shifts.

    These are the queries that must produce the answers; their hidden states are what distillation compares and
    their attention is what the scorer measures.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask


def load_model_and_tokenizer(
    name: str, device: torch.device, dtype: torch.dtype, tokenizer_name: str = SMOLLM2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``smollm2``, a local model directory, or ``tiny-<arch>`` (a random tiny model using ``tokenizer_name``'s
    vocabulary, for smoke tests of the whole pipeline)."""
    if name.startswith(TINY_PREFIX):
        tokenizer = load_tokenizer(tokenizer_name)
        model = tiny_model(name[len(TINY_PREFIX) :], seed=seed, vocab_size=len(tokenizer))
        return model.to(device=device, dtype=dtype), tokenizer
    return load_model(name, dtype=dtype, device=device)


def install_shared_attention(
    model: PreTrainedModel, name: str, function: Callable, attr: str, state: Any
) -> InstalledAttention:
    """Install the attention mode ``name`` whose layers all read one ``state`` object (as ``module.<attr>``); an
    earlier install of the same mode is replaced, any other installed mode is refused. Undo with ``uninstall()``.
    Tensor-parallel models are refused: a rank's layers see only its heads, the gates and scores cover all of them
    (train with data parallelism instead, learn/data_parallel.py)."""
    if head_shard(model, decoder_layers(model)) is not None:
        raise ModelError(
            f"{name} needs every attention head in each process, but this model is split by tensor parallelism; "
            "load it whole on each rank (gate training runs data-parallel under torchrun)"
        )
    current = getattr(model, "duo_attention_mode", None)
    if current is not None and current.name == name:
        current.uninstall()
    return install_attention(model, name, function, attr=attr, layer_state=lambda _: state)


def whole_sequence_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal SDPA over one whole sequence without a cache, the only kind training and head scoring run.
    ``query [B, H, L, D]``, ``key/value [B, H_kv, L, D]``; returns ``[B, H, L, D]``."""
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("duo training and head scoring run whole sequences without a cache (use_cache=False)")
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)


def sink_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    sink_size: int,
    recent_size: int,
) -> torch.Tensor:
    """A streaming head's attention over one whole sequence: query ``i`` sees the keys ``j <= i`` with
    ``j < sink_size`` or ``i - j < recent_size``. ``query [B, H, L, D]``, ``key/value [B, H_kv, L, D]``; returns
    ``[B, H, L, D]``.

    Computed in blocks, never with an ``L x L`` mask: the queries are cut into blocks of ``recent_size``, and each
    block attends to the sink keys plus its own and the previous key block, which hold every window of the block.
    That costs ``O(L * (sink + 2 * recent))`` instead of ``O(L^2)``; and a dense masked call with grouped-query heads
    leaves SDPA only its math kernel on CUDA, whose fp32 ``[H, L, L]`` scores take 60 GB per layer at 32K tokens.
    """
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("duo training runs whole sequences without a cache (use_cache=False)")
    if sink_size < 0 or recent_size < 1:
        raise ValueError(f"need sink_size >= 0 and recent_size >= 1, got {sink_size}, {recent_size}")
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # the masked fused kernels take no grouped-query heads; the blocks are small enough to repeat
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    window, blocks = recent_size, -(-length // recent_size)
    pad, sinks = blocks * recent_size - length, min(sink_size, length)

    def per_block(tensor: torch.Tensor, before: int) -> torch.Tensor:
        """``[B, H, L, D]`` -> ``[B * blocks, H, rows, D]``: each block's rows, ``before`` blocks of history first."""
        padded = F.pad(tensor, (0, 0, before * window, pad))
        parts = [padded[:, :, i * window : (i + blocks) * window] for i in range(before + 1)]
        rows = torch.cat([part.unflatten(2, (blocks, window)) for part in parts], dim=3)  # [B, H, blocks, rows, D]
        if before:  # the keys: the sinks come first in every block
            sink_rows = tensor[:, :, None, :sinks].expand(batch, heads, blocks, sinks, dim)
            rows = torch.cat([sink_rows, rows], dim=3)
        return rows.transpose(1, 2).flatten(0, 1)

    query_pos = torch.arange(blocks * window, device=query.device).view(blocks, 1, window, 1)
    block_start = torch.arange(blocks, device=query.device).view(blocks, 1, 1, 1) * window
    local_pos = block_start - window + torch.arange(2 * window, device=query.device).view(1, 1, 1, -1)
    sink_pos = torch.arange(sinks, device=query.device).view(1, 1, 1, -1)
    in_window = (local_pos >= sink_size) & (local_pos <= query_pos) & (query_pos - local_pos < recent_size)
    mask = torch.cat([(sink_pos <= query_pos).expand(blocks, 1, window, sinks), in_window], dim=3)
    out = F.scaled_dot_product_attention(
        per_block(query, 0), per_block(key, 1), per_block(value, 1), attn_mask=mask.repeat(batch, 1, 1, 1),
        scale=scaling,
    )  # fmt: skip
    return out.unflatten(0, (batch, blocks)).transpose(1, 2).flatten(2, 3)[:, :, :length]


def device_description(device: torch.device) -> str:
    """What ran the job, for config.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def run_provenance(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model, hardware and library versions behind a pattern, for its config.json."""
    return {
        "model_type": model.config.model_type,
        "num_layers": model.config.num_hidden_layers,
        "num_kv_heads": model.config.num_key_value_heads,
        "num_attention_heads": model.config.num_attention_heads,
        "resolved_device": str(device),
        "resolved_dtype": str(dtype).removeprefix("torch."),
        "device_name": device_description(device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def save_gate_heatmap(gates: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Layers x KV heads picture of a gate or score table; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = np.asarray(gates, dtype=np.float64)
    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * heads + 2.0), max(3.0, 0.22 * layers + 1.5)))
    image = ax.imshow(gates, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="gate (1 = retrieval head)")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


@dataclasses.dataclass
class PasskeyRunConfig:
    """Settings training and head scoring share: the model, the streaming window and the passkey data."""

    model: str = SMOLLM2
    tokenizer: str = SMOLLM2
    output_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    sink_size: int = 64  # the shipped SmolLM2 patterns' window; the paper used 128 for 7-8B models
    recent_size: int = 256
    context_length_min: int = 1024
    context_length_max: int = 8192
    context_length_intervals: int = 8
    num_passkeys: int = 10
    passkey_kind: str = "digits"
    passkey_length: int = 5
    haystack: str | None = None
    haystack_max_chars: int | None = None
    seed: int = 42
    # Tells the default pattern directories of different methods apart.
    dir_infix: ClassVar[str] = ""

    def pattern_dir(self) -> Path:
        """``--output-dir``, else ``attn_patterns/<model><dir_infix>-sink<S>-recent<R>``."""
        if self.output_dir:
            return Path(self.output_dir)
        name = Path(self.model.rstrip("/")).name or "model"
        return Path("attn_patterns") / f"{name}{self.dir_infix}-sink{self.sink_size}-recent{self.recent_size}"

    def load_model(self, device: torch.device | None = None) -> LoadedModel:
        """The model and tokenizer on the resolved device (or ``device``, a data-parallel rank's) and dtype, which are
        returned too."""
        device = resolve_device(self.device) if device is None else device
        dtype = resolve_dtype(self.dtype, device)
        model, tokenizer = load_model_and_tokenizer(self.model, device, dtype, self.tokenizer, self.seed)
        return model, tokenizer, device, dtype

    def passkey_dataset(self, tokenizer: PreTrainedTokenizerBase, num_samples: int) -> PasskeyDataset:
        """``num_samples`` passkey samples drawn as these settings say."""
        haystack = load_haystack(self.haystack, max_chars=self.haystack_max_chars)
        return PasskeyDataset(
            tokenizer,
            encode_haystack(tokenizer, haystack),
            seed=self.seed,
            num_samples=num_samples,
            num_passkeys=self.num_passkeys,
            passkey_kind=self.passkey_kind,
            passkey_length=self.passkey_length,
            min_context=self.context_length_min,
            max_context=self.context_length_max,
            num_intervals=self.context_length_intervals,
        )


ArgumentContainer = argparse.ArgumentParser | argparse._ArgumentGroup


def add_passkey_run_flags(
    defaults: PasskeyRunConfig, model: ArgumentContainer, window: ArgumentContainer, data: ArgumentContainer
) -> None:
    """The flags of `PasskeyRunConfig`, into the given parser or groups; --output-dir and --seed are left to each
    command, whose help for them differs."""
    d = defaults
    model.add_argument("--model", default=d.model,
                       help="'smollm2', a local model directory, or tiny-<arch> (smoke tests)")  # fmt: skip
    model.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer for tiny-<arch> models")
    model.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    model.add_argument("--dtype", default=d.dtype, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    window.add_argument("--sink-size", type=int, default=d.sink_size, help="attention-sink tokens of streaming heads")
    window.add_argument("--recent-size", type=int, default=d.recent_size,
                        help="recent-window tokens of streaming heads")  # fmt: skip
    data.add_argument("--context-length-min", type=int, default=d.context_length_min, help="shortest sample (tokens)")
    data.add_argument("--context-length-max", type=int, default=d.context_length_max, help="longest sample (tokens)")
    data.add_argument("--context-length-intervals", type=int, default=d.context_length_intervals,
                      help="number of evenly spaced context lengths between min and max")  # fmt: skip
    data.add_argument("--num-passkeys", type=int, default=d.num_passkeys, help="passkeys hidden per sample")
    data.add_argument("--passkey-kind", choices=("digits", "words"), default=d.passkey_kind, help="passkey alphabet")
    data.add_argument("--passkey-length", type=int, default=d.passkey_length, help="digits or words per passkey")
    data.add_argument("--haystack", default=d.haystack, help=".txt/.jsonl/.jsonl.zst filler (default: offline text)")
    data.add_argument("--haystack-max-chars", type=int, default=d.haystack_max_chars, help="read at most this much")
