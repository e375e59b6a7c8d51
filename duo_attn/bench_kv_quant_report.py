"""What a `duo_attn.bench_kv_quant` run measured and how it is reported: its points, the derived ratios (the ideal
byte ratio of int4 against bf16 duo, bytes read per step over copy bandwidth) and the markdown tables."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30


@dataclass
class Point:
    """One measurement. ``status``: ``ok``, ``OOM``, ``over cap`` (fitted only by exceeding the cap the allocator
    was given), ``skipped (budget)`` or ``cut short`` (a pre-fill stopped at the deadline)."""

    section: str  # "capacity", "largest", "speed" or "prefill"
    kv_quant: str | None  # None: the model dtype (bf16)
    context: int  # tokens in the cache when decoding
    cap_gib: float | None  # the process's memory cap; None: the whole device
    status: str
    ms: float | None = None  # median decode ms per token
    kernel_ms: float | None = None  # GPU kernel time per decode step (profiler), without launch gaps
    peak_gib: float | None = None  # max allocated during the point, weights included
    reserved_gib: float | None = None  # max reserved by the allocator (what the cap bounds)
    kv_bytes: int | None = None  # what the cache holds (codes, scales, zeros, streaming slots)
    fill_s: float | None = None  # seconds to fill the cache with random keys and values
    prefill_s: float | None = None  # seconds of a real chunked pre-fill
    prefill_tokens: int | None = None  # tokens it pre-filled (fewer than asked if cut short)
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.status == "ok"


def bandwidth_share(point: Point, weight_bytes: int, copy_bandwidth: float | None) -> float | None:
    """Percent of the measured copy bandwidth (read + write) that the step's bytes read (weights + the cache's KV
    bytes) per step time make: the same measure as bench.py's ``BW % copy``."""
    if point.ms is None or point.kv_bytes is None or not copy_bandwidth:
        return None
    return 100 * (weight_bytes + point.kv_bytes) / (point.ms / 1e3) / copy_bandwidth


def speed_rows(points: list[Point], weight_bytes: int, copy_bandwidth: float | None) -> list[dict]:
    """Per context of the ``speed`` section: bf16 and quantized decode, the speedup, the ideal byte ratio (weights +
    KV bytes, bf16 over quantized) and the speedup's share of it."""
    by = {(p.context, p.kv_quant is None): p for p in points if p.section == "speed"}
    rows = []
    for context in sorted({c for c, _ in by}):
        dense, quant = by.get((context, True)), by.get((context, False))
        ideal = speedup = None
        if dense and quant and dense.kv_bytes and quant.kv_bytes:
            ideal = (weight_bytes + dense.kv_bytes) / (weight_bytes + quant.kv_bytes)
        if dense and quant and dense.ms and quant.ms:
            speedup = dense.ms / quant.ms
        rows.append({
            "context": context, "kv_quant": quant.kv_quant if quant else None,
            "bf16 ms": dense.ms if dense else None, "quant ms": quant.ms if quant else None,
            "speedup": speedup, "ideal (bytes)": ideal,
            "of ideal": None if speedup is None or ideal is None else speedup / ideal,
            "bf16 BW % copy": bandwidth_share(dense, weight_bytes, copy_bandwidth) if dense else None,
            "quant BW % copy": bandwidth_share(quant, weight_bytes, copy_bandwidth) if quant else None,
            "bf16 peak GiB": dense.peak_gib if dense else None, "quant peak GiB": quant.peak_gib if quant else None,
            "bf16 status": dense.status if dense else "-", "quant status": quant.status if quant else "-",
        })  # fmt: skip
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(nothing measured)"]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GIB


def markdown_report(meta: dict, points: list[Point]) -> str:
    """Header, then one table per section measured: capacity (and the largest contexts found), speed, pre-fill."""
    weights, bandwidth = meta["weight_bytes"], meta.get("copy_bandwidth_Bps")
    lines = [
        f"# Quantized KV cache on one GPU: {meta['shape']}, {meta['retrieval_fraction']:.0%} retrieval heads "
        f"({meta['pattern']}), retrieval KV {meta['kv_quant']}",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, triton "
        f"{meta['triton']}; weights {weights / GIB:.2f} GiB; copy bandwidth "
        + (f"{bandwidth / 1e9:.0f} GB/s (read + write)" if bandwidth else "not measured (no GPU)")
        + f"; sink {meta['sink']} + recent {meta['recent']}; run took {meta.get('seconds', 0):.0f} s of a "
        f"{meta['max_seconds']} s budget.",
        "",
        "Capacity and speed caches: random keys/values written through the cache's write path (planned chunks, "
        "`Cache.update`, quantized as written), not a forward pass. Decode: median ms per token of "
        f"{meta['decode_steps']} {meta['decode']} steps. Peak: max allocated (reserved: what the allocator held, "
        "which the cap bounds), weights included.",
        "",
    ]
    capacity = [p for p in points if p.section in ("capacity", "largest")]
    if capacity:
        rows = [{
            "cap": f"{p.cap_gib:g} GiB" if p.cap_gib else "none", "found by": p.section, "context": p.context,
            "status": p.status, "ms/token": p.ms, "kernel ms": p.kernel_ms, "peak GiB": p.peak_gib,
            "reserved GiB": p.reserved_gib, "KV GiB": _gib(p.kv_bytes),
            "BW % copy": bandwidth_share(p, weights, bandwidth), "fill s": p.fill_s,
        } for p in capacity]  # fmt: skip
        lines += ["## Capacity: decode at long contexts", "", *table(rows), ""]
        for cap in dict.fromkeys(p.cap_gib for p in capacity):
            fitted = [p.context for p in capacity if p.cap_gib == cap and p.fits]
            failed = [p.context for p in capacity if p.cap_gib == cap and p.status in ("OOM", "over cap")]
            above = [c for c in failed if not fitted or c > max(fitted)]
            lines.append(
                f"- cap {f'{cap:g} GiB' if cap else 'none'}: largest context that decoded "
                f"{max(fitted) if fitted else '–'}" + (f"; smallest that did not {min(above)}" if above else "")
            )
        lines.append("")
    speed = speed_rows(points, weights, bandwidth)
    if speed:
        lines += ["## Speed: quantized against bf16 duo decode", "", *table(speed), ""]
    prefill = [p for p in points if p.section == "prefill"]
    if prefill:
        rows = [{
            "tokens asked": p.context, "tokens pre-filled": p.prefill_tokens, "status": p.status,
            "seconds": p.prefill_s, "tokens/s": (p.prefill_tokens / p.prefill_s) if p.prefill_s else None,
            "peak GiB": p.peak_gib, "KV GiB": _gib(p.kv_bytes), "decode ms/token after": p.ms, "note": p.note,
        } for p in prefill]  # fmt: skip
        lines += ["## A real chunked pre-fill", "", *table(rows), ""]
    return "\n".join(lines)


def save(out: Path, name: str, meta: dict, points: list[Point]) -> None:
    """``<name>.json`` and ``<name>.md`` in ``out``; rewritten after every point, so a run cut short keeps them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=1))
    (out / f"{name}.md").write_text(markdown_report(meta, points))
