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
    gates: np.ndarray,
    sparsity: float | None = None,
    threshold: float | None = None,
    *,
    min_retrieval_per_layer: int = 0,
) -> tuple[np.ndarray, float]:
    """Turn gates into a 0/1 retrieval-head mask; returns ``(mask[L, H_kv] bool, actual_sparsity)``.

    ``sparsity`` is the fraction of KV heads made streaming, ranked globally over all layers by gate value: the
    ``round(sparsity * n)`` lowest gates become streaming. Ties are broken deterministically by (layer, head) order:
    among equal gates the earlier head in row-major order is made streaming first. ``threshold`` alone keeps heads
    whose gate is >= threshold as retrieval heads. The input is never modified.

    ``min_retrieval_per_layer``: each layer's that many highest-gate heads (the last of the layer in the order above)
    stay retrieval heads whatever the ranking, since a global ranking can leave a layer none, and that layer then
    sees only sink + recent tokens: with 2 KV heads per layer, half of the shipped learned Qwen2.5-Coder-0.5B heads
    streaming empties 7 of its 24 layers. With ``sparsity`` the number of streaming heads stays
    ``round(sparsity * n)``, the lowest gates among the other heads; a sparsity the floor leaves no room for is an
    error. With ``threshold`` the floor's heads are added to those at or above it.
    """
    gates = np.asarray(gates, dtype=np.float64)
    check_gates(gates)
    if (sparsity is None) == (threshold is None):
        raise PatternError("give exactly one of sparsity or threshold")
    floor = _retrieval_floor(min_retrieval_per_layer, gates.shape[1])
    flat = gates.ravel()
    order = np.lexsort((np.arange(flat.size), flat))  # by gate, then by row-major index: the order heads go streaming
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    # each layer's `floor` heads that would go streaming last
    kept = np.zeros(gates.shape, dtype=bool)
    np.put_along_axis(kept, np.argsort(rank.reshape(gates.shape), axis=1)[:, gates.shape[1] - floor :], True, axis=1)
    if sparsity is not None:
        sparsity = _fraction("sparsity", sparsity)
        n_streaming = int(round(float(sparsity) * flat.size))
        room = flat.size - int(kept.sum())
        if n_streaming > room:
            raise PatternError(
                f"sparsity {sparsity:g} makes {n_streaming} of {flat.size} KV heads streaming, but "
                f"min_retrieval_per_layer={floor} keeps {floor} of {gates.shape[1]} heads in each of {gates.shape[0]} "
                f"layers, leaving at most {room} streaming heads (sparsity {room / flat.size:.4g})"
            )
        candidates = order[~kept.ravel()[order]]
        mask = np.ones(flat.size, dtype=bool)
        mask[candidates[:n_streaming]] = False
        mask = mask.reshape(gates.shape)
    else:
        mask = (gates >= _fraction("threshold", threshold)) | kept
    return mask, float(1.0 - mask.mean())


def _retrieval_floor(value: object, num_kv_heads: int) -> int:
    """A retrieval-head floor per layer: an integer in [0, num_kv_heads]; booleans and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatternError(f"min_retrieval_per_layer must be an integer, got {type(value).__name__} {value!r}")
    if value < 0:
        raise PatternError(f"min_retrieval_per_layer must be >= 0, got {value}")
    if value > num_kv_heads:
        raise PatternError(
            f"min_retrieval_per_layer={value} is more than the pattern's {num_kv_heads} KV heads per layer"
        )
    return int(value)


def check_retrieval_floor(mask: np.ndarray, min_retrieval_per_layer: int) -> None:
    """Refuse a 0/1 mask with a layer below the floor: a mask is used as given, never topped up with heads the
    caller did not choose."""
    mask = np.asarray(mask, dtype=bool)
    floor = _retrieval_floor(min_retrieval_per_layer, mask.shape[1])
    short = np.flatnonzero(mask.sum(axis=1) < floor)
    if short.size:
        raise PatternError(
            f"the 0/1 mask keeps fewer than min_retrieval_per_layer={floor} retrieval heads in layer(s) "
            f"{', '.join(map(str, short.tolist()))}; a mask is used as given: pass gates, or a mask that meets "
            "the floor"
        )


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
