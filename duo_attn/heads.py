"""Head geometry: which KV heads of a layer are retrieval heads, which query heads read them, moving tensors between
the model's head order and the two head groups, and permuting a layer's projection weights by head."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .placement import local_shard


@dataclass(frozen=True)
class HeadLayout:
    """Which KV heads of one layer are retrieval heads, and which query heads read them (GQA groups)."""

    retrieval_kv: tuple[int, ...]
    streaming_kv: tuple[int, ...]
    num_kv_heads: int
    groups: int
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # derived values, computed once

    @classmethod
    def from_mask(cls, retrieval_row: np.ndarray, num_q_heads: int) -> HeadLayout:
        row = np.asarray(retrieval_row, dtype=bool)
        num_kv = row.size
        if num_q_heads % num_kv:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv} KV heads")
        return cls(
            tuple(int(h) for h in np.flatnonzero(row)),
            tuple(int(h) for h in np.flatnonzero(~row)),
            num_kv,
            num_q_heads // num_kv,
        )

    @property
    def retrieval_first(self) -> bool:
        """Retrieval heads are the first heads of the layer (the order `enable_duo_attention_eval` gives them)."""
        if "retrieval_first" not in self._memo:
            self._memo["retrieval_first"] = self.retrieval_kv == tuple(range(len(self.retrieval_kv)))
        return self._memo["retrieval_first"]

    def warm(self, device: torch.device) -> None:
        """Fill every memo entry the attention reads, while eager: a compiled step that found one missing would add
        it, and the changed dict would fail that step's guards (traced again at the next step)."""
        _ = self.retrieval_first
        for kv_heads in (self.retrieval_kv, self.streaming_kv):
            if kv_heads:
                for heads, total in ((kv_heads, self.num_kv_heads), (self.query_heads(kv_heads), self.num_q_heads)):
                    if self.head_slice(heads, total) is None:
                        self.device_index(heads, device)

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.groups

    def query_heads(self, kv_heads: tuple[int, ...]) -> tuple[int, ...]:
        key = ("query", kv_heads)
        if key not in self._memo:
            self._memo[key] = tuple(h * self.groups + g for h in kv_heads for g in range(self.groups))
        return self._memo[key]

    def device_index(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The head list as an index tensor on ``device``, made once (no host-to-device copy per step)."""
        key = ("index", heads, device)
        if key not in self._memo:
            self._memo[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._memo[key]

    def head_slice(self, heads: tuple[int, ...], total: int) -> slice | None:
        """``heads`` as a slice of ``total`` heads when they are one contiguous run, else None."""
        key = ("slice", heads, total)
        if key not in self._memo:
            contiguous = heads == tuple(range(heads[0], heads[0] + len(heads)))
            self._memo[key] = slice(heads[0], heads[0] + len(heads)) if contiguous else None
        return self._memo[key]


def select_heads(x: torch.Tensor, heads: tuple[int, ...], total: int, layout: HeadLayout) -> torch.Tensor:
    """``x[:, heads]``: the tensor itself, a view when the heads are one contiguous run, else a gather."""
    if len(heads) == total:
        return x
    part = layout.head_slice(heads, total)
    return x[:, part] if part is not None else x.index_select(1, layout.device_index(heads, x.device))


def merge_heads(
    query: torch.Tensor, layout: HeadLayout, retrieval_out: torch.Tensor | None, streaming_out: torch.Tensor | None
) -> torch.Tensor:
    """Put the two head groups' outputs ``[B, H_group, Q, D]`` back in the model's head order."""
    if streaming_out is None:
        return retrieval_out
    if retrieval_out is None:
        return streaming_out
    if layout.retrieval_first:  # heads reordered at enable time
        return torch.cat([retrieval_out, streaming_out], dim=1)
    out = query.new_empty(query.shape)
    out.index_copy_(1, layout.device_index(layout.query_heads(layout.retrieval_kv), out.device), retrieval_out)
    out.index_copy_(1, layout.device_index(layout.query_heads(layout.streaming_kv), out.device), streaming_out)
    return out


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def can_permute_heads(attn: torch.nn.Module, num_q: int, num_kv: int) -> bool:
    """Plain linear projections whose weights this process holds (not quantized, not offloaded) with ``num_q`` query
    and ``num_kv`` KV heads (under tensor parallelism, the rank's own) can be permuted."""
    head_dim = getattr(attn, "head_dim", None)
    mods = [getattr(attn, name, None) for name in PROJECTIONS]
    if head_dim is None or any(not isinstance(m, torch.nn.Linear) for m in mods):
        return False
    q, k, v, o = (local_shard(m.weight) for m in mods)
    return (
        q.shape[0] == num_q * head_dim and k.shape[0] == v.shape[0] == num_kv * head_dim
        and o.shape[1] == num_q * head_dim
        and all(w.is_floating_point() and w.device.type != "meta" for w in (q, k, v, o))  # not offloaded
    )


@torch.no_grad()
def permute_heads(attn: torch.nn.Module, kv_order: np.ndarray, groups: int) -> None:
    """Permute the KV heads (and their query groups) of one attention module: rows of q/k/v, columns of o. Under
    tensor parallelism, ``kv_order`` orders the rank's own heads and only its shards are written."""
    head_dim = attn.head_dim
    q_order = (kv_order[:, None] * groups + np.arange(groups)).reshape(-1)
    for name, order in (("q_proj", q_order), ("k_proj", kv_order), ("v_proj", kv_order)):
        proj = getattr(attn, name)
        for param in (proj.weight, proj.bias):
            if param is not None:
                param = local_shard(param)
                index = torch.as_tensor(order, device=param.device)
                blocks = param.reshape(len(order), head_dim, *param.shape[1:])
                param.copy_(blocks.index_select(0, index).reshape(param.shape))
    weight = local_shard(attn.o_proj.weight)
    blocks = weight.reshape(weight.shape[0], len(q_order), head_dim)
    weight.copy_(blocks.index_select(1, torch.as_tensor(q_order, device=weight.device)).reshape(weight.shape))
