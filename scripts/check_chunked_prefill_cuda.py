"""CUDA check of generate's compiled chunked pre-fill on a patched tiny model: greedy ``generate`` with
``prefill_chunk_size`` three times (transformers' default compile path, CUDA graphs), the same prompt first and last.
``--lazy`` reserves the StaticDuoCache at its first pre-fill, as before early initialization, which fails.

    PYTHONPATH=$PWD python scripts/check_chunked_prefill_cuda.py [--lazy]
"""
import argparse
import numpy as np
import torch
from duo_attn import enable_duo_attention_eval
from duo_attn.kv_cache import StaticDuoCache
from duo_attn.models import tiny_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--lazy", action="store_true", help="skip the cache's early initialization (the old behaviour)")
args = parser.parse_args()
if args.lazy:
    StaticDuoCache.early_initialization = lambda self, *a, **k: None
model = tiny_model("qwen2", vocab_size=512).to("cuda", torch.bfloat16)
mask = np.random.default_rng(0).random((model.config.num_hidden_layers, model.config.num_key_value_heads)) > 0.5
enable_duo_attention_eval(model, mask, sink_size=16, recent_size=32)
outs = []
for n in (300, 517, 300):
    ids = torch.randint(0, 512, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         prefill_chunk_size=128, pad_token_id=0)
    outs.append(out[0, n:].tolist())
if outs[0] != outs[2]:
    raise SystemExit(f"lazy={args.lazy}: the same prompt gave other tokens the second time: {outs[0]} vs {outs[2]}")
print(f"lazy={args.lazy}: ok, three chunked generates ran and the repeated prompt gave the same tokens")
