"""The arithmetic and reporting of an efficiency benchmark run (`duo_attn.bench`): its measured points, the ideal
ratios they are held against (decode: bytes moved, weights + KV; pre-fill: FLOPs), the summary tables, the plots and
the saved results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# transformers' eager forward on its DynamicCache; its StaticCache under its own compiled generate; duo with every head
# retrieval and with a pattern, each step a CUDA-graph replay (StaticDecoder); the duo-patched model's own generate
DECODE_METHODS = ("hf", "hf-static", "duo-full", "duo", "duo-generate")
PREFILL_METHODS = ("hf", "duo-full", "duo")


@dataclass
class Point:
    kind: str
    method: str
    context: int
    chunk: int | None
    ms: float | None  # per-token decode latency or whole pre-fill latency; None = OOM
    peak_gib: float | None
    kv_bytes: int | None
    kernel_ms: float | None = None  # decode: GPU kernel time per token (what a launch-free step would take)
    top_kernels: list | None = None  # decode: the heaviest kernels, (name, ms per token)
    compile_s: float | None = None  # generate methods: the longest warm-up step (where the step was compiled)


_MISSING = Point("decode", "", 0, None, None, None, None)  # a method not measured in this run


def full_kv_bytes(config, tokens: int) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 2


def prefill_flops(config, context: int, chunk: int, retrieval: float, window: int | None) -> float:
    """Attention + linear FLOPs of a chunked pre-fill; ``window`` = sink + recent for streaming heads."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    per_token_linear = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * config.intermediate_size)
    attention = 0.0
    for start in range(0, context, chunk):
        c = min(chunk, context - start)
        full_keys = start + (c + 1) / 2  # average keys per query, causal
        keys = retrieval * full_keys + (1 - retrieval) * (min(full_keys, window) if window else full_keys)
        attention += 4 * c * keys * head_dim * config.num_attention_heads * layers
    return per_token_linear * context + attention + 2 * hidden * config.vocab_size


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value, column: str):
        if value is None:  # a measurement that ran out of memory, or a ratio that needs one
            return "OOM" if column.endswith((" ms", " s", "GiB")) and not column.startswith("kernel") else "–"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summarise_decode(points: list[Point], config, wbytes: int, bandwidth: float) -> list[dict]:
    """One row per context: every method's ms, duo's speedups with the ideal byte ratio next to them, the share of
    copy bandwidth each duo step reaches, and peak memory. Columns that need a method this run did not measure are
    left out; a measured point without a time ran out of memory."""
    measured = {p.method for p in points}
    by = {(p.method, p.context): p for p in points}
    rows = []
    for context in sorted({p.context for p in points}):
        hf, static, full, duo, gen = (by.get((m, context)) or _MISSING for m in DECODE_METHODS)
        duo_kv = duo.kv_bytes or gen.kv_bytes
        ideal = _ratio(wbytes + full_kv_bytes(config, context), wbytes + duo_kv) if duo_kv else None
        vs_full = _ratio(full.ms, duo.ms)
        columns = [
            ("context", context, ()),
            *((f"{m} ms", p.ms, (m,)) for m, p in zip(DECODE_METHODS, (hf, static, full, duo, gen))),
            ("ideal", ideal, ()),
            ("duo-generate / duo", _ratio(gen.ms, duo.ms), ("duo", "duo-generate")),
            ("speedup vs hf", _ratio(hf.ms, duo.ms), ("hf", "duo")),
            ("duo-generate vs hf-static", _ratio(static.ms, gen.ms), ("hf-static", "duo-generate")),
            ("speedup vs duo-full", vs_full, ("duo-full", "duo")),
            ("of ideal (duo-full)", _ratio(vs_full, ideal), ("duo-full", "duo")),
            ("duo BW % copy", _bandwidth_share(wbytes + (duo.kv_bytes or 0), duo.ms, bandwidth), ("duo",)),
            ("duo-generate BW % copy", _bandwidth_share(wbytes + (gen.kv_bytes or 0), gen.ms, bandwidth),
             ("duo-generate",)),
            ("duo-full BW % copy", _bandwidth_share(wbytes + full_kv_bytes(config, context), full.ms, bandwidth),
             ("duo-full",)),
            *((f"{m} GiB", p.peak_gib, (m,)) for m, p in zip(DECODE_METHODS, (hf, static, full, duo, gen))),
            ("hf-static compile s", static.compile_s, ("hf-static",)),
            ("duo-generate compile s", gen.compile_s, ("duo-generate",)),
            ("kernel ms duo-full", full.kernel_ms, ("duo-full",)),
            ("kernel ms duo", duo.kernel_ms, ("duo",)),
        ]  # fmt: skip
        rows.append({name: value for name, value, needs in columns if measured.issuperset(needs)})
    return rows


def _bandwidth_share(nbytes: int, ms: float | None, bandwidth: float) -> float | None:
    return None if ms is None else 100 * nbytes / (ms / 1e3) / bandwidth


def summarise_prefill(points: list[Point], config, retrieval: float, window: int, wbytes: int) -> list[dict]:
    by = {(p.method, p.chunk): p for p in points}
    rows = []
    for chunk in sorted({p.chunk for p in points}):
        hf, full, duo = (by.get((m, chunk)) for m in PREFILL_METHODS)
        context = hf.context
        ideal = prefill_flops(config, context, chunk, 1.0, None) / prefill_flops(config, context, chunk, retrieval, window)
        ideal_memory = _ratio(wbytes + full_kv_bytes(config, context), wbytes + duo.kv_bytes) if duo.kv_bytes else None
        speedup, vs_full, saving = _ratio(hf.ms, duo.ms), _ratio(full.ms, duo.ms), _ratio(hf.peak_gib, duo.peak_gib)
        rows.append({
            "context": context, "chunk": chunk, "hf s": _ms_to_s(hf.ms), "duo-full s": _ms_to_s(full.ms),
            "duo s": _ms_to_s(duo.ms), "ideal (FLOPs)": ideal, "speedup vs hf": speedup,
            "speedup vs duo-full": vs_full, "of ideal (duo-full)": _ratio(vs_full, ideal),
            "hf GiB": hf.peak_gib, "duo-full GiB": full.peak_gib, "duo GiB": duo.peak_gib,
            "memory saving vs hf": saving, "ideal (weights + KV)": ideal_memory,
            "memory of ideal": _ratio(saving, ideal_memory),
        })
    return rows


def _ms_to_s(ms):
    return None if ms is None else ms / 1e3


def save_points(path: Path, meta: dict, points: list[Point]) -> None:
    """Written after every point, so a run cut short keeps what it measured."""
    path.write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=1))


def plot(rows: list[dict], x: str, ys: list[str], ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for y in ys:
        points = [(r[x], r[y]) for r in rows if r.get(y) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=y)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
