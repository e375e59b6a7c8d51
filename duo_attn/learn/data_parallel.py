"""Data-parallel gate training under ``torchrun``: every rank holds the whole frozen model and the same gates, runs its
share of each optimizer step's samples, and the gates' gradients are summed over the ranks before the optimizer step.

The gates are the only trainable tensor (a few hundred floats), so no DDP wrapper is needed: one all-reduce of their
gradient per step keeps the replicas identical, and N ranks compute what one process computes on the same global
batch (the same samples; only the order of the floating-point sums differs). The model is not wrapped either: it
is frozen, and each rank's forward passes are independent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}  # torch.distributed's backend for each device type


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of a data-parallel run (rank 0 of 1 without ``torchrun``) and the device
    it trains on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this object started the process group, and `close` ends it

    @classmethod
    def from_environment(cls, device: torch.device) -> DataParallel:
        """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), starting it with the
        backend for ``device`` unless the caller already did; a single process on ``device`` without one. Each rank
        of a multi-GPU run takes its own GPU (``LOCAL_RANK``) when ``device`` names no index."""
        joined = dist.is_available() and dist.is_initialized()
        if not joined and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if joined:
            return cls(dist.get_rank(), dist.get_world_size(), device)
        if device.type not in BACKENDS:
            raise ValueError(f"data-parallel training runs on {sorted(BACKENDS)} devices, not {device.type}")
        dist.init_process_group(BACKENDS[device.type], device_id=device if device.type == "cuda" else None)
        return cls(dist.get_rank(), dist.get_world_size(), device, owns_group=True)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, the pattern and logs, and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's indices among ``count`` samples of one step: every ``world_size``-th, from its rank."""
        return range(self.rank, count, self.world_size)

    def sum_gradient(self, parameter: torch.nn.Parameter) -> None:
        """Replace ``parameter.grad`` by its sum over the ranks (each rank's share is already scaled by the global
        sample count, so the sum is the global batch's gradient)."""
        if self.world_size > 1:
            dist.all_reduce(parameter.grad)

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Per-step numbers (loss shares, token counts) summed over the ranks."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return total.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any one (ranks decide to stop together, or they would hang)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self._collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        """End the process group if this object started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        """NCCL reduces GPU tensors only; gloo CPU tensors."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
