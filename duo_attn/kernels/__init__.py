"""Attention kernels, below everything else: dense (SDPA, optional flash-attn), flex (block-sparse streaming
pre-fill) and decode (the static-shape step: Triton split-KV on GPUs, masked SDPA elsewhere). Choosing between them
for a step is attention.py's job; a new backend is a module here plus one branch there."""
