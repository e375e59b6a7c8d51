"""Attention patterns: the learned gate table, its on-disk format, and the 0/1 head mask derived from it.

A pattern directory holds ``full_attention_heads.tsv`` (rows = layers, columns = KV heads, one gate per head, tab
separated) and ``config.json`` (at least ``sink_size`` and ``recent_size``). This is the format the DuoAttention
authors published, read here unchanged. The patterns shipped with the repository live under `SHIPPED_PATTERNS`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PatternError

GATES_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
# The repository's attn_patterns/ directory: <model name>/<setting>/ pattern directories (README, "Shipped patterns").
SHIPPED_PATTERNS = Path(__file__).resolve().parent.parent / "attn_patterns"

# Published gates were stored in bf16 and clamped before the optimiser step, so values a little outside [0, 1]
# occur (down to about -1.4e-3 in the authors' files). Larger excursions mean the file is not a gate table.
_CLIP_TOLERANCE = 0.05


def load_attn_pattern(path: str | os.PathLike) -> tuple[np.ndarray, int, int]:
    """Read a pattern directory; returns ``(gates[L, H_kv] float64 in [0, 1], sink_size, recent_size)``.

    Values slightly outside [0, 1] (a bf16/clamping artefact of the original training) are clipped with a warning
    that says how many were clipped; NaN/inf or values far outside the range are an error.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PatternError(f"attention pattern directory not found: {directory}")
    tsv, cfg = directory / GATES_FILE, directory / CONFIG_FILE
    for required in (tsv, cfg):
        if not required.is_file():
            raise PatternError(f"attention pattern {directory} has no {required.name}")
    gates = _read_gate_table(tsv)
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise PatternError(f"{cfg} is not valid JSON: {err}") from None
    sink_size, recent_size = _window_sizes(config, cfg)
    return gates, sink_size, recent_size


def _read_gate_table(tsv: Path) -> np.ndarray:
    rows = [line.split("\t") for line in tsv.read_text().splitlines() if line.strip()]
    if not rows:
        raise PatternError(f"{tsv} is empty")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise PatternError(f"{tsv}: rows have different numbers of columns {sorted(widths)}")
    try:
        gates = np.array([[float(value) for value in row] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise PatternError(f"{tsv}: not a table of numbers ({err})") from None
    check_gates(gates, source=str(tsv))
    outside = int(((gates < 0) | (gates > 1)).sum())
    if outside:
        warnings.warn(
            f"{tsv}: clipped {outside} gate value(s) slightly outside [0, 1] "
            f"(range was [{gates.min():.3g}, {gates.max():.3g}])",
            stacklevel=3,
        )
        gates = np.clip(gates, 0.0, 1.0)
    return gates


def check_gates(gates: np.ndarray, *, source: str = "gates") -> None:
    """Reject anything that is not a finite 2-D gate table within clipping distance of [0, 1]."""
    if gates.ndim != 2 or 0 in gates.shape:
        raise PatternError(f"{source}: expected a non-empty 2-D table (layers x KV heads), got shape {gates.shape}")
    if not np.isfinite(gates).all():
        bad = np.argwhere(~np.isfinite(gates))[0]
        raise PatternError(f"{source}: non-finite gate at layer {bad[0]}, KV head {bad[1]}")
    if gates.min() < -_CLIP_TOLERANCE or gates.max() > 1 + _CLIP_TOLERANCE:
        raise PatternError(f"{source}: gate values must lie in [0, 1], got range [{gates.min():.4g}, {gates.max():.4g}]")


def _window_sizes(config: dict[str, Any], source: Path) -> tuple[int, int]:
    sizes = []
    for key in ("sink_size", "recent_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PatternError(f"{source}: '{key}' must be a non-negative integer, got {value!r}")
        sizes.append(value)
    if sizes[0] + sizes[1] == 0:
        raise PatternError(f"{source}: sink_size + recent_size must be positive")
    return sizes[0], sizes[1]


def default_pattern(root: Path = SHIPPED_PATTERNS) -> Path | None:
    """The first directory (sorted, searched recursively) under ``root`` that holds a gate table, if any."""
    if not root.is_dir():
        return None
    found = sorted(path.parent for path in root.rglob(GATES_FILE))
    return found[0] if found else None


def save_attn_pattern(
    path: str | os.PathLike,
    gates: np.ndarray,
    sink_size: int,
    recent_size: int,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a pattern directory in the published format; each file is replaced atomically (temp file + rename)."""
    gates = np.asarray(gates, dtype=np.float64)
    check_gates(gates)
    _window_sizes({"sink_size": sink_size, "recent_size": recent_size}, Path(path) / CONFIG_FILE)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    table = "\n".join("\t".join(f"{value:.18e}" for value in row) for row in np.clip(gates, 0, 1)) + "\n"
    settings = {**(config or {}), "sink_size": int(sink_size), "recent_size": int(recent_size)}
    atomic_write_text(directory / GATES_FILE, table)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(settings, indent=2, default=str) + "\n")
    return directory


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``target`` to write to; it replaces ``target`` only if the block succeeds, so a kill
    mid-write leaves the previous file intact. The temporary file never outlives the block."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Replace ``target`` with ``text`` (UTF-8, synced to disk before the rename) through `atomic_path`."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def sparsify_attention_heads(
    gates: np.ndarray, sparsity: float | None = None, threshold: float | None = None
) -> tuple[np.ndarray, float]:
    """Turn gates into a 0/1 retrieval-head mask; returns ``(mask[L, H_kv] bool, actual_sparsity)``.

    ``sparsity`` is the fraction of KV heads made streaming, ranked globally over all layers by gate value: the
    ``round(sparsity * n)`` lowest gates become streaming. Ties are broken deterministically by (layer, head) order:
    among equal gates the earlier head in row-major order is made streaming first. ``threshold`` alone keeps heads
    whose gate is >= threshold as retrieval heads. The input is never modified.
    """
    gates = np.asarray(gates, dtype=np.float64)
    check_gates(gates)
    if (sparsity is None) == (threshold is None):
        raise PatternError("give exactly one of sparsity or threshold")
    if sparsity is not None:
        sparsity = _fraction("sparsity", sparsity)
        flat = gates.ravel()
        n_streaming = int(round(float(sparsity) * flat.size))
        order = np.lexsort((np.arange(flat.size), flat))  # by gate, then by row-major index
        mask = np.ones(flat.size, dtype=bool)
        mask[order[:n_streaming]] = False
        mask = mask.reshape(gates.shape)
    else:
        mask = gates >= _fraction("threshold", threshold)
    return mask, float(1.0 - mask.mean())


def _fraction(name: str, value: object) -> float:
    """A real number in [0, 1]; strings and booleans are refused rather than converted."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PatternError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise PatternError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_pattern_fits(mask_or_gates: np.ndarray, num_layers: int, num_kv_heads: int) -> None:
    """Clear error when a pattern's shape does not match the model it is applied to."""
    shape = np.shape(mask_or_gates)
    if len(shape) != 2:
        raise PatternError(f"a pattern must be 2-D (layers x KV heads), got shape {shape}")
    if shape[0] != num_layers:
        raise PatternError(f"pattern has {shape[0]} layers but the model has {num_layers}")
    if shape[1] != num_kv_heads:
        raise PatternError(f"pattern has {shape[1]} KV heads per layer but the model has {num_kv_heads}")
