"""Training checkpoints: written atomically, with every random generator's state, so that a resumed run continues
exactly where the interrupted one stopped."""

from __future__ import annotations

import random
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..patterns import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"
_CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generator states, as tensors and plain Python (``weights_only`` loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save({"version": _CHECKPOINT_VERSION, **payload}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain Python only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')!r}")
    return payload


def check_resumable(saved: dict[str, Any], current: dict[str, Any], ignored: Collection[str], path: Path) -> None:
    """Refuse to resume when a setting (other than the ``ignored`` run-control ones) differs from the checkpoint's."""
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r} vs now {value!r}"
        for key, value in current.items()
        if key not in ignored and saved.get(key) != value
    ]
    if diffs:
        raise ValueError(f"{path} was written with different settings; cannot resume:\n  " + "\n  ".join(diffs))


def checkpoint_to_resume(
    path: Path, resume: bool, settings: dict[str, Any], ignored: Collection[str]
) -> dict[str, Any] | None:
    """The checkpoint a ``--resume`` continues (None for a fresh run); an existing one without ``resume``, or one
    written with other ``settings`` (the ``ignored`` ones aside), is an error."""
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --output-dir")
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint["config"], settings, ignored, path)
    return checkpoint
