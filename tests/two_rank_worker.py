"""One rank of the two-process tests, run by ``torchrun --nproc-per-node 2`` (test_distributed.py; one launch for both,
since starting the processes costs more than the checks):

1. ``--models DIR ...``: load each tiny model saved there twice, whole and split by transformers' tensor parallelism,
   patch both with the same pattern, and check that this rank's cache holds its heads only, that logits (pre-fill and
   decode steps) and greedy tokens (transformers' generate and duo_attn.generate's static path) match, and that gate
   training refuses the split model;
2. ``--train FLAGS``: data-parallel gate training through its command line (``duo_attn.learn.train``), in the
   process group this script started.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/two_rank_worker.py --models DIR ... \
        --train --model tiny-llama ...
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from duo_attn import DuoCache, ModelError, enable_duo_attention_eval
from duo_attn.compat import cache_kwargs
from duo_attn.generate import generate
from duo_attn.learn import train as gate_training
from duo_attn.learn.train import attach_gates

SINK, RECENT = 2, 4
COLLECTIVE_TIMEOUT_S = 120
# [layers, kv_heads]: every rank's block of two heads has one head of each kind, in both orders, so the patch
# reorders inside a shard in one layer and leaves the other as it is
PATTERN = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)


def _inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 20 tokens, the second left-padded by 3: the streaming heads drop tokens, padding is exercised."""
    ids = torch.randint(3, vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _prefill_and_decode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int = 4):
    """Pre-fill in two chunks, then ``steps`` greedy decode steps; returns every step's logits and the cache."""
    cache = DuoCache.for_model(model)
    logits = []
    with torch.no_grad():
        for chunk in (slice(0, 12), slice(12, None)):
            out = model(input_ids=ids[:, chunk], attention_mask=mask[:, : chunk.stop], **cache_kwargs(model, cache))
            logits.append(out.logits)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            token = logits[-1][:, -1:].argmax(-1)
            logits.append(model(input_ids=token, attention_mask=mask, **cache_kwargs(model, cache)).logits)
    return torch.cat(logits, 1), cache


def check_model(path: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    split = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto")
    ).eval()
    assert split.tp_size == world, split.tp_size
    whole_state = enable_duo_attention_eval(whole, PATTERN, sink_size=SINK, recent_size=RECENT)
    state = enable_duo_attention_eval(split, PATTERN, sink_size=SINK, recent_size=RECENT)
    per_rank = PATTERN.shape[1] // world
    heads = slice(rank * per_rank, (rank + 1) * per_rank)
    assert state.shard is not None and state.shard.kv_heads == heads, state.shard
    np.testing.assert_array_equal(state.local_mask, PATTERN[:, heads])
    assert state.head_orders is not None  # reordered inside the shard
    ids, mask = _inputs(split.config.vocab_size)

    expected, whole_cache = _prefill_and_decode(whole, ids, mask)
    got, cache = _prefill_and_decode(split, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer, row in zip(cache.layers, state.local_mask):  # this rank's heads only
        assert layer.store.keys.shape[1] == row.sum() and layer.stream_keys.shape[1] == (~row).sum()
    held = torch.tensor([cache.nbytes()], dtype=torch.long)
    dist.all_reduce(held)
    assert held.item() == whole_cache.nbytes(), (held.item(), whole_cache.nbytes())

    with torch.no_grad():
        options = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        torch.testing.assert_close(split.generate(ids, **options), whole.generate(ids, **options), rtol=0, atol=0)
        static = {"max_new_tokens": 6, "attention_mask": mask}
        torch.testing.assert_close(generate(split, ids, **static), generate(whole, ids, **static), rtol=0, atol=0)
    assert whole_state.shard is None
    try:  # gate training needs every head in each process
        attach_gates(split, torch.nn.Parameter(torch.ones(PATTERN.shape)), SINK, RECENT)
    except ModelError as error:
        assert "tensor parallelism" in str(error), error
    else:
        raise AssertionError("gate training accepted a tensor-parallel model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="tiny model directories for the tensor-parallel check")
    parser.add_argument("--train", nargs=argparse.REMAINDER, default=None, help="duo_attn.learn.train flags")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # once (a group started again in the same process may read the old one's keys), and a hung collective fails
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for path in args.models:
            check_model(path)
        print(f"{len(args.models)} models match", flush=True)
        if args.train is not None:
            gate_training.main(args.train)
            assert dist.is_initialized(), "the training ended a process group it did not start"
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
