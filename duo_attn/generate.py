"""Fast generation for a duo-patched model, on the compileable `StaticDuoCache`.

An eager transformers forward pass costs tens of milliseconds of host time for a 7B model (hundreds of small kernel
launches), more than the GPU needs to read the weights and a duo cache. On a `StaticDuoCache` every decode step
launches the same kernels with the same arguments, so a step can be compiled or captured once and replayed.

Two drivers of that one step:

- ``model.generate(...)`` itself: after `enable_duo_attention_eval` (``compile_generate=True``), transformers' own
  generate gets a `StaticDuoCache` wherever it compiles its decode step (CUDA), with every decoding option.
- `StaticDecoder` (and the greedy `generate` below, built on it): for users who drive the step themselves; the
  step is captured in a CUDA graph by hand, and the pre-fill is chunked with only the last position's logits.

    python -m duo_attn.generate --help   # generate on SmolLM2 and time the paths against each other
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .compat import cache_kwargs
from .errors import DuoCacheError
from .kv_cache import StaticDuoCache
from .masks import positions_from_padding


class StaticDecoder:
    """One-token decode steps on a pre-filled `StaticDuoCache`: eager, or captured in a CUDA graph and replayed.

    The first call runs eagerly (on a side stream: kernels are compiled and libraries initialised outside capture),
    the second captures the step; every later call is a replay.
    """

    def __init__(self, model: torch.nn.Module, cache: StaticDuoCache, cuda_graph: bool | None = None):
        if not isinstance(cache, StaticDuoCache) or cache.static_step is None:
            raise DuoCacheError(
                "StaticDecoder needs a pre-filled StaticDuoCache: make one with StaticDuoCache.for_model(model, "
                "capacity) and run the prompt through the model first"
            )
        self.model, self.cache = model, cache
        device = cache.static_step.query_pos.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {device}")
        self.input_ids = torch.zeros_like(cache.static_step.query_pos)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.calls = 0

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.input_ids, **cache_kwargs(self.model, self.cache), use_cache=True).logits

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids [B, 1]``; return the next-token logits ``[B, vocab]``."""
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(f"expected input_ids of shape {tuple(self.input_ids.shape)}, got {tuple(input_ids.shape)}")
        self.input_ids.copy_(input_ids)
        self.calls += 1
        if not self.cuda_graph:
            return self._forward()[:, -1]
        if self.calls == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward()[:, -1]
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.cache.seen >= self.cache.capacity:
            raise DuoCacheError(f"the static cache is full ({self.cache.capacity} tokens)")
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the host counter is not advanced here
                self.graph_logits = self._forward()[:, -1]
        self.graph.replay()
        self.cache.advance_host(1)
        return self.graph_logits.clone()


def compile_decoder_modules(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer's norms and MLP (``Module.compile``, in place), leaving attention eager.

    A decode step of a 7B model is hundreds of tiny element-wise kernels (RMSNorm alone is six per call); fused, they
    cost far fewer launches inside the captured graph. Every layer shares one compiled graph per module type.
    """
    from .models import decoder_layers

    for layer in decoder_layers(model):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            getattr(layer, name).compile(dynamic=False)
    getattr(model, "base_model", model).norm.compile(dynamic=False)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    prefill_chunk: int = 32768,
    eos_token_id: int | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Greedy decoding with duo attention; returns the ``[B, max_new_tokens]`` new ids (after ``eos_token_id`` a
    sequence repeats it). The prompt is pre-filled in chunks of ``prefill_chunk`` tokens (only the last position's
    logits are computed) into a `StaticDuoCache` sized for prompt + new tokens; each step is a `StaticDecoder` call
    (a CUDA-graph replay on a GPU; ``cuda_graph=False`` turns it off).
    """
    if getattr(model, "duo_attention", None) is None:
        raise DuoCacheError("the model is not patched: call enable_duo_attention_eval(model, pattern) first")
    if max_new_tokens < 1 or prefill_chunk < 1:
        raise ValueError(f"max_new_tokens and prefill_chunk must be positive, got {max_new_tokens}, {prefill_chunk}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length > 0, got shape {tuple(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError("generate expects left padding: the last column of attention_mask must be all ones")
    length = input_ids.shape[1]
    cache = StaticDuoCache.for_model(model, length + max_new_tokens)
    positions = positions_from_padding(mask, length, device).clamp(min=0)  # padding's outputs are never used
    for start in range(0, length, prefill_chunk):
        end = min(start + prefill_chunk, length)
        logits = model(
            input_ids=input_ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
            **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1,
        ).logits[:, -1]

    token = logits.argmax(-1, keepdim=True)
    done = torch.zeros_like(token, dtype=torch.bool)
    generated = [token]
    decoder = StaticDecoder(model, cache, cuda_graph)
    for step in range(1, max_new_tokens):
        if eos_token_id is not None:
            done |= token == eos_token_id
            if step % 8 == 0 and bool(done.all()):
                break
        token = decoder(token).argmax(-1, keepdim=True)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
        generated.append(token)
    out = torch.cat(generated, dim=1)
    if out.shape[1] < max_new_tokens:
        out = torch.cat([out, out.new_full((out.shape[0], max_new_tokens - out.shape[1]), eos_token_id)], dim=1)
    return out


PASSKEY_PROMPT = "The grass is green. The sky is blue. " * 25 + "The pass key is 71432. Remember it. " + (
    "The sun is warm. " * 20
) + "What is the pass key?"


def _decode_ms(fn: Callable[[int], torch.Tensor], new_tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Milliseconds per decoded token, the pre-fill excluded: ``fn(n)`` generates ``n`` tokens; after a warm-up run
    (compilation, capture), the time of ``n = 1`` is taken from that of ``n = new_tokens``."""

    def timed(n: int) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    fn(new_tokens)
    one, _ = timed(1)
    many, out = timed(new_tokens)
    return (many - one) * 1e3 / (new_tokens - 1), out


def main(argv: list[str] | None = None) -> None:
    from .models import DTYPES, SMOLLM2, load_model
    from .patch import disable_duo_attention, enable_duo_attention_eval
    from .patterns import SHIPPED_PATTERNS, default_pattern

    parser = argparse.ArgumentParser(
        prog="duo-attn generate",
        description="Greedy generation with duo attention, timed per decoded token against transformers' generate "
        "(eager on its dynamic cache, and compiled on its static cache), the patched model's own generate (compiled on "
        "a StaticDuoCache where transformers compiles, i.e. on CUDA; eager with disable_compile) and duo_attn.generate.",
    )
    parser.add_argument("--model", default=SMOLLM2, help="'smollm2' (offline) or a local model directory")
    parser.add_argument("--pattern", type=Path, default=default_pattern(SHIPPED_PATTERNS))
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads made streaming")
    parser.add_argument("--prompt", default=PASSKEY_PROMPT, help="user message (default: a passkey question)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32"
    )
    args = parser.parse_args(argv)
    if args.pattern is None or not args.pattern.is_dir():
        parser.error(f"--pattern {args.pattern} is not a pattern directory")
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be at least 2 (the time per token is a difference of two runs)")

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    new, device = args.max_new_tokens, model.device

    def hf_generate(**options):
        def run(n: int) -> torch.Tensor:
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **options)  # fmt: skip
            return out[:, ids.shape[1] :]

        return run

    rows = [
        ("model.generate, unpatched (dynamic cache)", *_decode_ms(hf_generate(), new, device)),
        ('model.generate, unpatched, cache_implementation="static"',
         *_decode_ms(hf_generate(cache_implementation="static"), new, device)),
    ]  # fmt: skip
    enable_duo_attention_eval(model, args.pattern, sparsity=args.sparsity)
    rows.append(("model.generate, duo-patched", *_decode_ms(hf_generate(), new, device)))
    rows.append(("model.generate, duo-patched, disable_compile=True",
                 *_decode_ms(hf_generate(disable_compile=True), new, device)))  # fmt: skip
    rows.append(("duo_attn.generate, eager steps",
                 *_decode_ms(lambda n: generate(model, ids, n, cuda_graph=False), new, device)))  # fmt: skip
    if device.type == "cuda":
        rows.append(("duo_attn.generate, CUDA graph", *_decode_ms(lambda n: generate(model, ids, n), new, device)))
    disable_duo_attention(model)

    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.model}, {args.dtype}, {ids.shape[1]}-token prompt, {new} new tokens, pattern {args.pattern.name} "
          f"at sparsity {args.sparsity}, {where}, torch {torch.__version__}\n")  # fmt: skip
    print("| method | ms per decoded token | output |\n|---|---|---|")
    for label, ms, out in rows:
        answer = tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ").replace("|", "/")
        print(f"| {label} | {ms:.2f} | {answer[:60]} |")


if __name__ == "__main__":
    main()
