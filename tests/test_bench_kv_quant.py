"""The quantized-KV capacity and speed measurement (duo_attn.bench_kv_quant): its search, its arithmetic, and a CPU
smoke run of every section at tiny sizes (the measurement itself needs a GPU: docs/kv_quant.md)."""

import json

import numpy as np
import pytest
import torch

from duo_attn import bench_kv_quant, enable_duo_attention_eval
from duo_attn.bench_kv_quant import Budget, next_context
from duo_attn.bench_kv_quant_report import Point, speed_rows
from duo_attn.kv_cache import StaticDuoCache

pytestmark = pytest.mark.usefixtures("one_thread")
G = bench_kv_quant.CONTEXT_GRANULE
TINY = ["--shape", "tiny", "--device", "cpu", "--decode-steps", "2", "--warmup", "1", "--prefill-chunk", "96"]


def test_the_search_tries_the_prediction_then_grows_then_bisects():
    assert next_context(100 * G, None, 150 * G) == 150 * G  # the prediction first
    assert next_context(150 * G, None, 150 * G) == 153 * G  # it fitted: 2% further until something fails
    assert next_context(100 * G, 120 * G, 150 * G) == 110 * G  # the prediction lies past a failure: bisect
    assert next_context(100 * G, 101 * G, None) is None  # a granule apart: done
    assert next_context(0, None, None) is None  # nothing fitted and nothing predicted: nothing to search
    assert next_context(0, 64 * G, None) == 32 * G
    assert next_context(100 * G + 5, None, 100 * G + 7) % G == 0


def test_speed_rows_hold_the_speedup_against_the_ideal_byte_ratio():
    weights, gib = 15 * 2**30, 2**30
    points = [
        Point("speed", None, 1000, None, "ok", ms=30.0, kv_bytes=60 * gib),
        Point("speed", "int4", 1000, None, "ok", ms=12.0, kv_bytes=19 * gib),
        Point("speed", None, 5000, None, "OOM"),
        Point("capacity", "int4", 1000, None, "ok", ms=1.0, kv_bytes=1),  # another section: not a speed row
    ]
    first, oom = speed_rows(points, weights, copy_bandwidth=4e12)
    assert first["ideal (bytes)"] == pytest.approx(75 / 34) and first["speedup"] == pytest.approx(2.5)
    assert first["of ideal"] == pytest.approx(2.5 / (75 / 34))
    assert first["quant BW % copy"] == pytest.approx(100 * 34 * gib / 0.012 / 4e12)
    assert oom["speedup"] is None and oom["bf16 status"] == "OOM" and oom["quant status"] == "-"


def test_fill_random_writes_through_the_cache_and_quantizes_as_it_writes():
    model = bench_kv_quant.build_model("tiny", "cpu")
    mask = np.array([[True, False], [True, True]])
    enable_duo_attention_eval(model, mask, sink_size=4, recent_size=8, kv_quant="int4")
    cache = StaticDuoCache.for_model(model, 700)
    bench_kv_quant.fill_random(cache, model.config, 600, torch.device("cpu"), block=256)
    assert int(cache.get_seq_length()) == 600 == cache.seen
    store = cache.layers[1].store
    keys, _ = store.read(600, torch.float32)
    assert keys.abs().amax() > 0 and not store.read(700, torch.float32)[0][:, :, 600:].any()


def test_a_cpu_smoke_run_of_every_section_writes_its_tables(tmp_path, capsys):
    out = tmp_path / "run"
    points = bench_kv_quant.main([
        *TINY, "--capped-contexts", "300", "--uncapped-contexts", "400", "--speed-contexts", "300",
        "--prefill-context", "250", "--out", str(out), "--name", "smoke",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "capped contexts [300] skipped: the memory cap needs a GPU" in printed
    assert [(p.section, p.kv_quant, p.status) for p in points] == [
        ("capacity", "int4", "ok"), ("speed", None, "ok"), ("speed", "int4", "ok"), ("prefill", "int4", "ok"),
    ]  # fmt: skip
    bf16, int4 = points[1:3]
    assert int4.kv_bytes < bf16.kv_bytes and all(p.ms > 0 for p in points)
    assert points[3].prefill_tokens == 250 and points[3].prefill_s > 0
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["meta"]["kv_quant"] == "int4-g16" and len(saved["points"]) == 4
    markdown = (out / "smoke.md").read_text()
    for heading in ("## Capacity", "## Speed", "## A real chunked pre-fill", "written through the cache's write path"):
        assert heading in markdown and heading in printed


def test_a_budget_cuts_the_prefill_short_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    seconds_left = iter([100.0, 100.0, 100.0, -1.0])  # the section check, then before each chunk
    monkeypatch.setattr(Budget, "left", lambda self: next(seconds_left, -1.0))
    (prefill,) = bench_kv_quant.main([*TINY, "--sections", "prefill", "--prefill-context", "300", "--out", str(tmp_path)])
    assert prefill.status == "cut short" and prefill.prefill_tokens == 192 and prefill.ms > 0
    assert "the budget ended after 192 tokens" in prefill.note
    monkeypatch.setattr(Budget, "left", lambda self: 5.0)  # less than a decode point costs
    skipped = bench_kv_quant.main([*TINY, "--sections", "speed", "--speed-contexts", "300", "--out", str(tmp_path)])
    assert [p.status for p in skipped] == ["skipped (budget)"] * 2 and skipped[0].ms is None


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        bench_kv_quant.main(["--kv-quant", "none", "--device", "cpu"])
    assert "--kv-quant none" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_kv_quant.main([])
        assert "no GPU here" in capsys.readouterr().err


def test_out_of_memory_is_a_status_and_other_errors_are_raised():
    point = Point("capacity", "int4", 10, 80.0, "ok")
    bench_kv_quant._out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"), point)
    assert point.status == "OOM" and point.note == "CUDA out of memory. Tried to allocate 2 GiB"
    with pytest.raises(RuntimeError, match="a real bug"):
        bench_kv_quant._out_of_memory(RuntimeError("a real bug"), Point("capacity", "int4", 10, None, "ok"))
