"""Where a model's attention heads live when one process does not hold all of it on one device.

- Tensor parallelism (transformers' ``tp_plan``): q/k/v are split column-wise, so each rank computes only its own
  block of KV heads (and their query groups). `head_shard` says which block, so that the patch builds each rank's
  `DuoCache` and head layouts for those heads only.
- accelerate placement (``device_map``): weights offloaded to the CPU or disk are loaded onto one execution device for
  each forward pass, which duo attention supports. Layers *executing* on different devices are refused by
  `check_one_execution_device`: the pre-hook plans a forward pass once, on the input's device, and every layer shares
  that plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .compat import HEAD_SHARDING_STYLE, tensor_parallel_style
from .errors import ModelError

OFFLOAD_DEVICES = ("cpu", "disk")  # accelerate device-map entries whose weights run on the main execution device


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard (writes to it change the DTensor), else the
    tensor itself. Duck-typed: torch builds without torch.distributed have no DTensor class to test against."""
    return tensor.to_local() if hasattr(tensor, "to_local") and hasattr(tensor, "placements") else tensor


@dataclass(frozen=True)
class HeadShard:
    """The contiguous block of KV heads (the same in every layer) that one tensor-parallel rank computes."""

    rank: int
    world_size: int
    num_kv_heads: int  # the model's, all ranks together

    @property
    def kv_heads(self) -> slice:
        """This rank's KV heads, in the model's head order."""
        per_rank = self.num_kv_heads // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def local_mask(self, retrieval_mask: np.ndarray) -> np.ndarray:
        """The ``[layers, kv_heads]`` mask's columns of this rank's heads."""
        return retrieval_mask[:, self.kv_heads]


def head_shard(model: torch.nn.Module, layers: list[torch.nn.Module]) -> HeadShard | None:
    """This rank's block of KV heads when transformers' tensor parallelism splits the attention heads; None when this
    process computes every head. An attention split duo attention does not know is refused."""
    config = model.config
    attn = layers[0].self_attn
    styles = {name: tensor_parallel_style(model, getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj")}
    if set(styles.values()) == {None}:
        return None
    if set(styles.values()) != {HEAD_SHARDING_STYLE}:
        raise ModelError(
            f"the tensor-parallel plan splits the attention projections as {styles}; duo attention supports q/k/v "
            f"all {HEAD_SHARDING_STYLE!r} (each rank computes its own heads) or all unsplit"
        )
    weight = attn.k_proj.weight
    placements = getattr(weight, "placements", None)
    shards = [i for i, p in enumerate(placements or ()) if p.is_shard(0)]
    if len(shards) != 1:
        raise ModelError(
            f"k_proj of a {HEAD_SHARDING_STYLE!r} tensor-parallel model should be a DTensor split on its rows over "
            f"one mesh dimension; it is a {type(weight).__name__} with placements {placements}"
        )
    mesh_dim = shards[0]
    world_size = weight.device_mesh.size(mesh_dim)
    for what, count in (("KV", config.num_key_value_heads), ("query", config.num_attention_heads)):
        if count % world_size:
            raise ModelError(
                f"{count} {what} heads cannot be split evenly over {world_size} tensor-parallel ranks: a rank would "
                "hold part of a head, which duo attention (which keeps or streams whole heads) cannot use"
            )
    shard = HeadShard(weight.device_mesh.get_local_rank(mesh_dim), world_size, config.num_key_value_heads)
    expected_rows = (config.num_key_value_heads // world_size) * attn.head_dim
    if local_shard(weight).shape[0] != expected_rows:
        raise ModelError(
            f"rank {shard.rank}'s k_proj holds {local_shard(weight).shape[0]} rows, not the {expected_rows} of "
            f"{config.num_key_value_heads // world_size} whole KV heads"
        )
    return shard


def check_one_execution_device(model: torch.nn.Module) -> None:
    """Refuse an accelerate device map whose modules run on more than one device (offloaded modules run on the main
    device, as accelerate's dispatch does)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    executing = {_device_name(d) for d in device_map.values() if d not in OFFLOAD_DEVICES}
    if len(executing) > 1:
        raise ModelError(
            f"the model's device_map runs its modules on {len(executing)} devices ({', '.join(sorted(executing))}): "
            "duo attention plans each forward pass once, on the input's device, and every layer reads that plan, "
            "so layers on other devices cannot run. Place the model on one device (offloading weights to 'cpu' or "
            "'disk' works), or split it with tensor parallelism (DistributedConfig(tp_plan='auto') under torchrun)"
        )


def _device_name(entry: int | str | torch.device) -> str:
    """A device-map entry as a device name (accelerate writes accelerator indices as bare ints)."""
    if isinstance(entry, int):
        accelerator = torch.accelerator.current_accelerator()
        return f"{accelerator.type if accelerator is not None else 'cuda'}:{entry}"
    return str(torch.device(entry))
