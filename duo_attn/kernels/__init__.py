"""Attention kernels, below everything else but the storage formats (kv_quant.py, stores.py): dense (SDPA, optional
flash-attn), flex (block-sparse streaming pre-fill), decode (the static-shape step: Triton split-KV on GPUs, masked
SDPA elsewhere) and quant_decode (the same step over quantized K/V, and the step over any store). Choosing between
them for a step is attention.py's job; a new backend is a module here plus one branch there."""
