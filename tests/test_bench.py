"""The efficiency benchmark's arithmetic and reporting (the timings themselves need a GPU: docs/efficiency.md)."""

import json

import numpy as np
import pytest

from duo_attn import bench, bench_report
from duo_attn.bench_report import DECODE_METHODS, Point


def _config(shape="llama2-7b"):
    return bench.SHAPES[shape]()


def test_prefill_flops_ideal_follows_the_window():
    config = _config()
    full = bench_report.prefill_flops(config, 65536, 16384, 1.0, None)
    assert bench_report.prefill_flops(config, 65536, 16384, 0.25, None) == full  # no window: every head is full
    duo = bench_report.prefill_flops(config, 65536, 16384, 0.25, 384)
    assert 1.5 < full / duo < 2.0  # attention is a large share of 64K-token pre-fill FLOPs
    assert bench_report.prefill_flops(config, 65536, 16384, 0.0, 384) < duo
    # chunking does not change the work of a causal pre-fill with full attention
    assert bench_report.prefill_flops(config, 4096, 4096, 1.0, None) == pytest.approx(
        bench_report.prefill_flops(config, 4096, 1024, 1.0, None), rel=1e-3
    )


def test_decode_summary_reports_ratios_and_marks_out_of_memory_points():
    config = _config()
    wbytes, bandwidth = 13_000_000_000, 3e12
    full_kv = bench_report.full_kv_bytes(config, 100_000)
    points = [
        Point("decode", "hf", 100_000, None, 60.0, 60.0, full_kv, 55.0),
        Point("decode", "duo-full", 100_000, None, 25.0, 60.0, full_kv, 24.0),
        Point("decode", "duo", 100_000, None, 12.5, 25.0, full_kv // 4, 11.0),
        Point("decode", "hf-static", 100_000, None, 30.0, 60.0, full_kv, compile_s=40.0),
        Point("decode", "duo-generate", 100_000, None, 13.75, 26.0, full_kv // 4, compile_s=30.0),
        Point("decode", "hf", 400_000, None, None, None, None),
        Point("decode", "duo-full", 400_000, None, None, None, None),
        Point("decode", "duo", 400_000, None, 25.0, 60.0, bench_report.full_kv_bytes(config, 400_000) // 4, 24.0),
    ]
    rows = bench_report.summarise_decode(points, config, wbytes, bandwidth)
    first, last = rows
    assert first["ideal"] == pytest.approx((wbytes + full_kv) / (wbytes + full_kv // 4))
    assert first["speedup vs duo-full"] == 2.0 and first["speedup vs hf"] == 4.8
    assert first["of ideal (duo-full)"] == pytest.approx(2.0 / first["ideal"])
    assert first["duo BW % copy"] == pytest.approx(100 * (wbytes + full_kv // 4) / 0.0125 / bandwidth)
    assert first["duo-generate / duo"] == pytest.approx(1.1) and first["duo-generate vs hf-static"] == pytest.approx(30 / 13.75)
    assert first["hf-static compile s"] == 40.0
    assert last["speedup vs hf"] is None and last["duo ms"] == 25.0
    assert last["duo-generate ms"] is None and last["duo-generate / duo"] is None  # not measured at that context
    only_duo = bench_report.summarise_decode(points[2:3], config, wbytes, bandwidth)[0]
    assert "hf ms" not in only_duo and "speedup vs hf" not in only_duo and only_duo["duo ms"] == 12.5
    table = bench_report.markdown_table(rows, list(first))
    last_line = table.splitlines()[-1].split(" | ")
    columns = list(first)
    assert last_line[columns.index("hf ms")] == "OOM"  # a measurement that did not fit
    assert last_line[columns.index("speedup vs hf")] == "–"  # a ratio that needs it
    assert last_line[columns.index("kernel ms duo-full")] == "–"


def test_prefill_summary_memory_ideal():
    config = _config("llama3-8b")
    wbytes = 15_000_000_000
    full_kv = bench_report.full_kv_bytes(config, 320_000)
    points = [
        Point("prefill", m, 320_000, 32768, ms, gib, kv)
        for m, ms, gib, kv in (
            ("hf", 234_000.0, 83.8, full_kv),
            ("duo-full", 90_000.0, 56.2, full_kv),
            ("duo", 50_000.0, 36.7, full_kv // 2),
        )
    ]
    (row,) = bench_report.summarise_prefill(points, config, 0.5, 384, wbytes)
    assert row["hf s"] == 234.0 and row["speedup vs duo-full"] == pytest.approx(1.8)
    assert row["ideal (weights + KV)"] == pytest.approx((wbytes + full_kv) / (wbytes + full_kv // 2))
    assert row["memory saving vs hf"] == pytest.approx(83.8 / 36.7)


def test_head_mask_uses_the_published_pattern_or_a_seeded_random_one(tmp_path):
    config = _config("llama3-8b")
    mask, source = bench.head_mask("llama3-8b", 0.5, tmp_path, config)
    again, _ = bench.head_mask("llama3-8b", 0.5, tmp_path, config)
    assert source == "random" and mask.shape == (32, 8) and mask.mean() == 0.5 and np.array_equal(mask, again)


def test_points_are_saved_as_json(tmp_path):
    path = tmp_path / "run.json"
    bench_report.save_points(path, {"shape": "x"}, [Point("decode", m, 8, None, 1.0, 2.0, 3) for m in DECODE_METHODS])
    saved = json.loads(path.read_text())
    assert saved["meta"] == {"shape": "x"} and [p["method"] for p in saved["points"]] == list(DECODE_METHODS)


def test_the_benchmark_refuses_to_run_without_a_gpu(capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--shape", "llama2-7b"])
    assert "needs a GPU" in capsys.readouterr().err


def test_the_patterns_default_and_a_missing_directory_named_by_its_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(bench.PATTERNS_ENV, str(tmp_path / "patterns"))
    assert bench.default_patterns_dir() == tmp_path / "patterns"
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)  # the check comes before any GPU work
    with pytest.raises(SystemExit):
        bench.main(["--patterns-dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert "--patterns-dir" in err and bench.PATTERNS_ENV in err and "--random-heads" in err


@pytest.mark.parametrize("method", ["hf-static", "duo-generate"])
def test_generate_decode_continues_from_the_filled_cache_and_times_every_step(method, monkeypatch):
    """The generate methods' mechanism on the CPU (eager steps): generate takes the pre-filled cache, runs only the
    new token through the model, and the clock sees every decoding step."""
    from duo_attn import bench_generate
    from duo_attn.models import tiny_model
    from duo_attn.patch import enable_duo_attention_eval

    model = tiny_model("llama")
    config = model.config
    if method == "duo-generate":
        mask = np.zeros((config.num_hidden_layers, config.num_key_value_heads), dtype=bool)
        mask[:, 0] = True
        enable_duo_attention_eval(model, mask, sink_size=4, recent_size=8)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(k["input_ids"].shape[1]) or forward(*a, **k))
    ms, compile_s, _, kv = bench_generate.generate_decode_ms(model, method, 40, steps=4, warmup=2, device="cpu",
                                                             capacity=64)  # fmt: skip
    assert seen == [1] * 7  # the 40 cached tokens are never run again: one token per step, warm-up included
    assert ms > 0 and compile_s > 0
    head_dim = config.hidden_size // config.num_attention_heads
    token_bytes = 2 * config.num_hidden_layers * head_dim * 4  # keys + values, fp32, per KV head and token
    if method == "hf-static":
        assert kv == 64 * config.num_key_value_heads * token_bytes  # the whole reserved buffer
    else:
        # one retrieval head per layer holds the 40 cached + 7 fed tokens; the others, their sink + recent slots
        assert kv == 47 * token_bytes + (4 + 8) * (config.num_key_value_heads - 1) * token_bytes
