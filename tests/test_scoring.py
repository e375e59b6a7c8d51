"""Training-free head scores: the far-mass arithmetic on known inputs, the recording pass, and the written pattern."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import requires_smollm2

from duo_attn.models import tiny_model
from duo_attn.patch import enable_duo_attention_eval
from duo_attn.patterns import load_attn_pattern
from duo_attn.learn.scoring import (
    RAW_SCORES_FILE,
    ScoreConfig,
    attach_recorder,
    far_attention_mass,
    normalise_scores,
    score_heads,
    tail_attention_probs,
)
from duo_attn.learn.run import HEATMAP_FILE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_far_mass_of_hand_built_attention() -> None:
    # Keys 0..10; queries at 9 and 10; sink 2, recent 3: query 9 sees keys {0, 1, 7, 8, 9}, query 10 {0, 1, 8, 9, 10}.
    positions = torch.tensor([9, 10])
    probs = torch.zeros(1, 4, 2, 11)
    probs[0, 0, :, 0] = 1.0  # a sink: visible to a streaming head
    probs[0, 1, :, 5] = 1.0  # far back: invisible
    probs[0, 2, 0, 4] = probs[0, 2, 0, 9] = 0.5  # half far, half on itself
    probs[0, 2, 1, 4] = probs[0, 2, 1, 10] = 0.5
    probs[0, 3, :, 8] = 1.0  # inside the recent window of both queries
    mass = far_attention_mass(probs, positions, num_kv_heads=2, sink_size=2, recent_size=3)
    # KV head 0 groups query heads 0 and 1, KV head 1 groups 2 and 3.
    torch.testing.assert_close(mass, torch.tensor([[0.5, 0.25]]))


def test_tail_probabilities_are_the_causal_softmax_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 12, 8, generator=generator)
    key = torch.randn(2, 2, 12, 8, generator=generator)
    positions = torch.tensor([3, 7, 11])
    full_keys = key.repeat_interleave(2, dim=1)
    logits = query @ full_keys.transpose(-1, -2) * 8**-0.5
    logits = logits.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    expected = logits.softmax(-1)[:, :, positions]
    got = tail_attention_probs(query[:, :, positions], key, positions)
    torch.testing.assert_close(got, expected)
    assert (got[..., 0, 4:] == 0).all()


def test_a_head_built_to_look_far_back_scores_high() -> None:
    # One-hot keys: query head 0 matches key 2 (far back), query head 1 matches key 0 (a sink).
    length, dim = 20, 20
    key = torch.eye(length, dim)[None, None]
    query = torch.zeros(1, 2, 1, dim)
    query[0, 0, 0, 2] = query[0, 1, 0, 0] = 50.0
    positions = torch.tensor([length - 1])
    probs = tail_attention_probs(query, key.expand(1, 2, length, dim), positions, scaling=1.0)
    mass = far_attention_mass(probs, positions, num_kv_heads=2, sink_size=1, recent_size=4)
    assert mass[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert mass[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_recording_does_not_change_the_forward_pass() -> None:
    model = tiny_model("qwen2")
    input_ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids).logits
        recorder = attach_recorder(model, sink_size=2, recent_size=4)
        recorder.query_positions = torch.tensor([30, 35, 39])
        recorded = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(recorded, reference, rtol=1e-5, atol=1e-5)
    scores = recorder.scores()
    assert scores.shape == (2, 2) and (scores > 0).all() and (scores <= 1).all()
    recorder.installed.uninstall()
    assert not hasattr(model.model.layers[0].self_attn, "duo_score_recorder")
    enable_duo_attention_eval(model, np.ones((2, 2)), sink_size=2, recent_size=4)  # no mode left installed


def test_normalise_refuses_contexts_inside_the_window() -> None:
    np.testing.assert_allclose(normalise_scores(np.array([[0.2, 0.4]])), [[0.5, 1.0]])
    with pytest.raises(ValueError, match="sink_size"):
        normalise_scores(np.zeros((2, 2)))


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_scoring_writes_a_usable_pattern(tmp_path: Path) -> None:
    config = ScoreConfig(
        model="tiny-llama", output_dir=str(tmp_path / "scores"), device="cpu", sink_size=16, recent_size=32,
        num_samples=2, context_length_min=200, context_length_max=240, context_length_intervals=2, num_passkeys=2,
    )  # fmt: skip
    out = score_heads(config)
    gates, sink, recent = load_attn_pattern(out)
    assert gates.shape == (2, 2) and (sink, recent) == (16, 32)
    assert gates.min() >= 0.0 and gates.max() == 1.0
    raw = np.loadtxt(out / RAW_SCORES_FILE, delimiter="\t")
    np.testing.assert_allclose(gates, raw / raw.max(), rtol=1e-12)
    settings = json.loads((out / "config.json").read_text())
    assert settings["num_samples"] == 2 and settings["model"] == "tiny-llama" and "wall_time_s" in settings
    assert (out / HEATMAP_FILE).stat().st_size > 1000
    state = enable_duo_attention_eval(tiny_model("llama"), out, sparsity=0.5)
    assert state.sparsity == 0.5


def test_wrapper_script_shows_help() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_score.sh"), "--help"], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--num-samples" in result.stdout and "--sink-size" in result.stdout
