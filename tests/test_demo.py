"""The passkey demo: its command line, pattern discovery, and (slow) a real run on SmolLM2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import requires_smollm2

from duo_attn import demo, save_attn_pattern
from duo_attn.patterns import default_pattern

REPO = Path(__file__).resolve().parent.parent


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    assert "--pattern" in capsys.readouterr().out


def test_help_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "duo_attn.demo", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "--sparsity" in result.stdout


def test_default_pattern_is_the_first_directory_with_gates(tmp_path: Path):
    assert default_pattern(tmp_path / "missing") is None
    assert default_pattern(tmp_path) is None
    (tmp_path / "a-empty").mkdir()
    save_attn_pattern(tmp_path / "c", np.ones((2, 2)), 4, 8)
    save_attn_pattern(tmp_path / "b" / "nested", np.ones((2, 2)), 4, 8)
    assert default_pattern(tmp_path) == tmp_path / "b" / "nested"


def test_no_pattern_is_a_clear_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SHIPPED_PATTERNS", tmp_path)
    with pytest.raises(SystemExit) as info:
        demo.main([])
    assert info.value.code == 2
    assert "pass --pattern DIR" in capsys.readouterr().err


@pytest.mark.slow
@requires_smollm2
def test_demo_on_smollm2(tmp_path: Path, capsys):
    pattern = save_attn_pattern(tmp_path / "pattern", np.random.default_rng(0).random((30, 3)), 64, 256)
    records = demo.main(["--pattern", str(pattern), "--context-length", "512", "--depths", "0.3", "0.7"])
    out = capsys.readouterr().out
    assert len(records) == 4
    assert out.count("full answer:") == 2 and out.count("duo  answer:") == 2
    assert "KV cache after pre-fill" in out and "passkey" in out
    kv = {r["method"]: r["kv_bytes"] for r in records}
    assert kv["duo@0.50"] < kv["full"]


def test_a_bad_kv_quant_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--kv-quant", "int3"])
    assert info.value.code == 2
    assert "unknown KV quantization 'int3'" in capsys.readouterr().err
