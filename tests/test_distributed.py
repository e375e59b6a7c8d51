"""Scale-out on the CPU with gloo and two processes: tensor-parallel inference equals the single-process run (Llama
and Qwen2), data-parallel gate training equals one-process training on the same samples; accelerate offloading
works and layers on several devices are refused; what the placement code refuses, in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from helpers import SMOLLM2_INSTALLED, requires_smollm2
from transformers import AutoModelForCausalLM

import duo_attn.learn.train as train_module
from duo_attn import ModelError, enable_duo_attention_eval
from duo_attn.attention import LayerSpec
from duo_attn.heads import HeadLayout
from duo_attn.learn.data_parallel import DataParallel
from duo_attn.learn.train import TrainConfig, train
from duo_attn.models import decoder_layers, tiny_model
from duo_attn.patterns import load_attn_pattern

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SINK, RECENT = 2, 4
RUN_TIMEOUT_S = 300  # the torchrun launch; a hung collective fails the test instead of the CI job
pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(args: list[str], cwd: Path) -> str:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port is chosen by the rendezvous); on a timeout,
    stop torchrun so that it ends its ranks (the workers also time out their collectives). Returns the output; a
    failure shows its tail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::FutureWarning"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun ends its workers (each in a session of its own) on SIGTERM
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


# a tiny run whose 4 samples per step are shared by 2 ranks (0, 2 and 1, 3)
TRAIN_SETTINGS = {"model": "tiny-llama", "device": "cpu", "num_steps": 3, "grad_accum_steps": 4, "sink_size": 16,
                  "recent_size": 32, "context_length_min": 200, "context_length_max": 240,
                  "context_length_intervals": 2, "num_passkeys": 2, "checkpoint_every": 2, "lr": 0.1,
                  "reg_weight": 0.5}  # fmt: skip


def _train_config(out: Path) -> TrainConfig:
    return TrainConfig(output_dir=str(out), **TRAIN_SETTINGS)


def _train_flags(out: Path) -> list[str]:
    settings = {**TRAIN_SETTINGS, "output_dir": out}
    return [item for name, value in settings.items() for item in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One two-process launch for both tests below (starting processes costs more than the checks): tensor-parallel
    inference of tiny Llama and Qwen2 models with 8 query and 4 KV heads (two whole KV heads per rank), then
    data-parallel training where the SmolLM2 tokenizer its data needs is installed. Returns the output and the
    training's output directory."""
    root = tmp_path_factory.mktemp("two_ranks")
    paths = []
    for arch in ("llama", "qwen2"):
        tiny_model(arch, num_attention_heads=8, num_key_value_heads=4).save_pretrained(root / arch)
        paths.append(str(root / arch))
    args = [str(TESTS / "two_rank_worker.py"), "--models", *paths]
    if SMOLLM2_INSTALLED:
        args += ["--train", *_train_flags(root / "trained")]
    return _torchrun(args, root), root / "trained"


def test_tensor_parallel_inference_equals_one_process(two_ranks: tuple[str, Path]) -> None:
    output, _ = two_ranks
    assert output.count("2 models match") == 2, output[-3000:]


@requires_smollm2  # the tiny model borrows SmolLM2's tokenizer for its passkey data
def test_two_rank_training_equals_one_rank(two_ranks: tuple[str, Path], tmp_path: Path) -> None:
    _, trained = two_ranks
    alone = train(_train_config(tmp_path / "one"))
    gates, expected = load_attn_pattern(trained)[0], load_attn_pattern(alone)[0]
    np.testing.assert_allclose(gates, expected, rtol=0, atol=1e-6)
    assert (gates < 1.0).all()  # the gates moved: the comparison is not of two untouched initialisations
    logs = [[json.loads(line) for line in (out / train_module.LOG_FILE).read_text().splitlines()]
            for out in (alone, trained)]  # fmt: skip
    for one, other in zip(*logs, strict=True):
        assert one["tokens"] == other["tokens"]  # the same samples, all of them
        assert one["loss"] == pytest.approx(other["loss"], rel=1e-6)
    assert json.loads((trained / "config.json").read_text())["data_parallel_ranks"] == 2


def test_more_ranks_than_samples_per_step_is_refused(tmp_path: Path) -> None:
    config = _train_config(tmp_path)
    config.grad_accum_steps = 1
    with pytest.raises(ValueError, match="--grad-accum-steps"):
        train_module._train(config, None, DataParallel(rank=0, world_size=2))  # refused before any collective


def test_samples_are_shared_round_robin() -> None:
    shares = [list(DataParallel(rank, 3).share(7)) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(DataParallel().share(4)) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- accelerate placement

MASK = np.array([[0, 1], [1, 0]], dtype=bool)


def _greedy(model: torch.nn.Module, ids: torch.Tensor):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _assert_same_generation(got, expected) -> None:
    torch.testing.assert_close(got.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)


@pytest.fixture
def saved_llama(tmp_path: Path) -> Path:
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _reference(path: Path, ids: torch.Tensor):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)
    return _greedy(model, ids)


def test_disk_offloaded_device_map_works(saved_llama: Path, tmp_path: Path) -> None:
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        saved_llama, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert decoder_layers(model)[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    state = enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)
    assert state.head_orders is None  # offloaded weights are not permuted: heads are gathered per step instead
    _assert_same_generation(_greedy(model, ids), _reference(saved_llama, ids))


# accelerate's cpu_offload leaves every weight on the meta device, so transformers 5.17's generate warns that the
# inputs are not on the model's device (they are on its execution device, the CPU)
@pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids` being on a device type")
def test_cpu_offloaded_model_works(saved_llama: Path) -> None:
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.float32).eval()
    cpu_offload(model, execution_device=torch.device("cpu"))
    enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)
    _assert_same_generation(_greedy(model, ids), _reference(saved_llama, ids))


def test_layers_on_several_devices_are_refused() -> None:
    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    with pytest.raises(ModelError, match="2 devices"):
        enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cuda:0", "lm_head": "disk"}  # one device
    enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)


# ----------------------------------------------------------------------------- tensor-parallel refusals


def _claim_tensor_parallel(model: torch.nn.Module, style: str) -> None:
    """Make a whole model claim to be split with ``style`` on q/k/v (what transformers records on a split model)."""
    model._tp_size = 2
    model.tp_plan = {f"model.layers.*.self_attn.{name}": style for name in ("q_proj", "k_proj", "v_proj")}


def test_an_unknown_attention_split_is_refused() -> None:
    model = tiny_model("llama")
    _claim_tensor_parallel(model, "colwise_rep")
    with pytest.raises(ModelError, match="colwise_rep"):
        enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)


def test_a_head_split_without_sharded_weights_is_refused() -> None:
    model = tiny_model("llama")
    _claim_tensor_parallel(model, "colwise")
    with pytest.raises(ModelError, match="DTensor"):
        enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)


def test_heads_split_behind_the_patch_are_refused_at_run_time() -> None:
    model = tiny_model("llama")
    enable_duo_attention_eval(model, MASK, sink_size=SINK, recent_size=RECENT)
    attn = decoder_layers(model)[0].self_attn
    attn.duo_layer_spec = LayerSpec(HeadLayout.from_mask(MASK[0, :1], 2), SINK, RECENT, attn.duo_layer_spec.forward)
    with pytest.raises(ModelError, match="query heads"):
        model(torch.tensor([[5, 6, 7]]))


def test_a_tensor_parallel_model_is_not_handed_a_static_cache_to_compile(monkeypatch):
    """Where generate would compile, a sharded model still decodes eagerly on the dynamic cache: a compiled step with
    collectives is untried (the single-process model, forced to compile, gets the static cache: the contrast)."""
    from transformers import CompileConfig

    from duo_attn import DuoCache, StaticDuoCache

    model = tiny_model("llama")
    cfg = model.config
    state = enable_duo_attention_eval(model, np.ones((cfg.num_hidden_layers, cfg.num_key_value_heads)),
                                      sink_size=SINK, recent_size=RECENT)  # fmt: skip
    made = []
    new_cache = state.new_cache
    monkeypatch.setattr(state, "new_cache", lambda capacity=None: made.append(new_cache(capacity)) or made[-1])
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    ids = torch.randint(1, cfg.vocab_size, (1, 6))
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, compile_config=compile_config)
    model.generate(ids, **options)
    monkeypatch.setattr(state, "shard", object())  # only its presence matters to the cache choice
    model.generate(ids, **options)
    assert [type(c) for c in made] == [StaticDuoCache, DuoCache]
