"""The gate-training measurement (duo_attn.bench_train), smoke-tested with the tiny shape on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import duo_attn.bench_train as bench_train
from duo_attn.compat import set_activation_checkpointing
from duo_attn.models import decoder_layers, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_shape_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "points.json"
    args = ["--shape", "tiny", "--device", "cpu", "--contexts", "48", "--steps", "1", "--warmup", "0",
            "--json", str(out)]  # fmt: skip
    assert bench_train.main(args) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 48 |")]
    assert [row.split(" | ")[1] for row in rows] == ["on", "off"]
    assert "OOM" not in table and "tiny shape" in table
    points = json.loads(out.read_text())["points"]
    assert [(p["context"], p["checkpointing"]) for p in points] == [(48, True), (48, False)]
    assert all(p["step_s"] > 0 and p["peak_gib"] is None for p in points)  # no GPU: no peak memory


def test_out_of_memory_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def measure(model, state, context, *args):
        if context > 48:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 0.5, 3.0

    monkeypatch.setattr(bench_train, "measure_step", measure)
    points = bench_train.run("tiny", [48, 64], [True], steps=1, warmup=0, device=torch.device("cpu"))
    assert [p.oom for p in points] == [False, True]
    table = bench_train.markdown(points, "header")
    assert "| 48 | on | 0.50 | 96 | 3.0 |" in table and "| 64 | on | OOM | – | OOM |" in table


def test_activation_checkpointing_switches_on_and_off() -> None:
    model = tiny_model("llama")
    set_activation_checkpointing(model, True)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    set_activation_checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
