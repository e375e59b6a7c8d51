"""Every decoding option of transformers' own ``model.generate`` on a patched model, on both cache paths: the dynamic
`DuoCache` (eager steps) and the `StaticDuoCache` that transformers' compile path decodes on (forced on the CPU with
its testing switch and an eager backend that counts the compiled calls).

The references are transformers' ``generate`` itself, with the same options and the same seed: on the unpatched
model when every head is a retrieval head (the tokens must be identical), and on the float64 oracle of
duo_reference.py (cache-free, the rule applied by dense masks, ``use_cache=False``) when a pattern makes some heads
streaming heads with a window far shorter than the sequences. Every batch is left-padded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from duo_reference import device_model, oracle_model
from helpers import char_tokenizer, padded_batch
from transformers import CompileConfig, TextStreamer
from transformers.generation.streamers import BaseStreamer

from duo_attn import DuoCache, StaticDuoCache, disable_duo_attention, enable_duo_attention_eval
from duo_attn.compat import output_cache
from duo_attn.kernels.decode import decode_attention_op
from duo_attn.patch import SUPPORTED_MODEL_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["all-retrieval", "pattern"]
PATHS = ["dynamic", "compiled"]
SINK, RECENT = 3, 2  # a window of 5 tokens: prompts of 2 and 9 real tokens plus the new ones outgrow it
NEW = 7
TOKENIZER = char_tokenizer()
PATTERN = np.array([[True, False], [False, True]])  # a streaming head per layer (the second layer's is reordered)
# logits against the unpatched model's (float32 both), or the oracle's float64 ones as generate casts them
TOLERANCE = {"all-retrieval": dict(atol=1e-5, rtol=1e-5), "pattern": dict(atol=1e-4, rtol=1e-4)}
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3)


@dataclass
class Record:
    """What one ``generate`` call did on a patched model: the caches it made and the calls of the compiled step."""

    caches: list[type] = field(default_factory=list)
    compiled_calls: int = 0


RECORD = Record()


def _counting_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """An eager backend that counts the calls of what it compiled (a function: generate deep-copies its compile
    config, and a function is copied as itself)."""

    def run(*args):
        RECORD.compiled_calls += 1
        return gm.forward(*args)

    return run


COMPILE = CompileConfig(backend=_counting_backend, fullgraph=True)  # fullgraph: a decode step is one graph
COMPILE._compile_all_devices = True
PATH_OPTIONS = {"dynamic": {"disable_compile": True}, "compiled": {"compile_config": COMPILE}}


@dataclass
class Models:
    """One architecture's models, all with the same weights: the unpatched model, its float64 oracle for `PATTERN`,
    and two patched copies (every head a retrieval head; `PATTERN`)."""

    plain: torch.nn.Module
    oracle: torch.nn.Module
    patched: dict[str, torch.nn.Module]

    def reference(self, kind: str) -> tuple[torch.nn.Module, dict]:
        return (self.plain, {}) if kind == "all-retrieval" else (self.oracle, {"use_cache": False})


def _patch(arch: str, mask: np.ndarray) -> torch.nn.Module:
    model = device_model(arch, vocab_size=len(TOKENIZER))
    state = enable_duo_attention_eval(model, mask, sink_size=SINK, recent_size=RECENT)
    new_cache = state.new_cache

    def recorded(capacity=None):
        cache = new_cache(capacity)
        RECORD.caches.append(type(cache))
        return cache

    state.new_cache = recorded
    return model


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, Models]]:
    """Built once per architecture for the module: each patched model keeps its compiled step across tests."""
    built: dict[str, Models] = {}

    class Lazy(dict):
        def __missing__(self, arch: str) -> Models:
            plain = device_model(arch, vocab_size=len(TOKENIZER))
            full = np.ones_like(PATTERN)
            built[arch] = Models(
                plain, oracle_model(plain, PATTERN, SINK, RECENT),
                {"all-retrieval": _patch(arch, full), "pattern": _patch(arch, PATTERN)},
            )  # fmt: skip
            return built[arch]

    with torch._dynamo.config.patch(recompile_limit=64):  # one code object (Module.__call__) serves every model
        yield Lazy()
    for entry in built.values():
        for model in entry.patched.values():
            disable_duo_attention(model)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 tokens, the first left-padded to 2 real tokens: shorter than the sink, whose slots decoding
    fills. The seed is one where no row makes the eos token unasked and the window changes every row's tokens."""
    return padded_batch(np.random.default_rng(6), len(TOKENIZER), 2, 9, [7, 0])


@torch.no_grad()
def _generate(model, ids, padding, *, seed: int = 0, **options):
    torch.manual_seed(seed)
    return model.generate(
        ids.to(model.device), attention_mask=padding.to(model.device), max_new_tokens=NEW, **options
    )


def _sequences(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.sequences).cpu()


def _run(models: Models, kind: str, path: str, ids, padding, *, eager_steps: bool = False, **options):
    """``generate`` on the patched model along ``path``, checked to have gone that way: one cache of the path's
    type and, compiled, every decode step a call of the compiled graph (``eager_steps``: none, as in beam search)."""
    RECORD.caches.clear()
    RECORD.compiled_calls = 0
    out = _generate(models.patched[kind], ids, padding, **options, **PATH_OPTIONS[path])
    assert RECORD.caches == [StaticDuoCache if path == "compiled" else DuoCache]
    decode_steps = _sequences(out).shape[1] - ids.shape[1] - 1
    expected_calls = decode_steps if path == "compiled" and not eager_steps else 0
    assert RECORD.compiled_calls == expected_calls
    return out


def _expected(models: Models, kind: str, ids, padding, **options):
    model, extra = models.reference(kind)
    return _generate(model, ids, padding, **options, **extra)


def _check(models: Models, kind: str, path: str, ids, padding, *, eager_steps: bool = False, **options):
    """Ours along ``path`` and the reference, same options and seed: the same tokens. Returns both outputs."""
    expected = _expected(models, kind, ids, padding, **options)
    ours = _run(models, kind, path, ids, padding, eager_steps=eager_steps, **options)
    assert torch.equal(_sequences(ours), _sequences(expected)), options
    for name in ("scores", "logits") if options.get("return_dict_in_generate") else ():
        if options.get(f"output_{name}"):
            assert len(getattr(ours, name)) == _sequences(ours).shape[1] - ids.shape[1]
            torch.testing.assert_close(torch.stack(getattr(ours, name)).cpu(), torch.stack(getattr(expected, name)),
                                       **TOLERANCE[kind])  # fmt: skip
    return ours, expected


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_greedy_and_seeded_sampling(models, arch, kind, path):
    """Greedy decoding (its logits too) and sampling with temperature, top-k, top-p and a repetition penalty (same
    seed, same tokens) on a left-padded batch, for every architecture."""
    entry = models[arch]
    ids, padding = _batch()
    greedy, _ = _check(entry, kind, path, ids, padding, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)  # fmt: skip
    _check(entry, kind, path, ids, padding, **SAMPLING)
    if kind == "pattern":  # the window matters: no row makes the unpatched model's tokens
        unpatched = _generate(entry.plain, ids, padding, do_sample=False)
        assert all(not torch.equal(ours, theirs) for ours, theirs in zip(greedy.sequences, unpatched))


needs_both = pytest.mark.parametrize("kind,path", [(k, p) for k in KINDS for p in PATHS])


@needs_both
def test_num_return_sequences(models, kind, path):
    ids, padding = _batch()
    ours, _ = _check(models["llama"], kind, path, ids, padding, num_return_sequences=3, **SAMPLING)
    assert ours.shape[0] == 6 and not torch.equal(ours[0], ours[1])  # three different samples per prompt


@needs_both
def test_eos_stops_a_row_then_the_whole_batch(models, kind, path):
    """A row that makes its eos token is padded from there while the other runs on; when every row has, generate
    stops before ``max_new_tokens``."""
    entry = models["llama"]
    ids, padding = _batch()
    free = _sequences(_expected(entry, kind, ids, padding, do_sample=False))[:, ids.shape[1] :]
    step = next(k for k in range(1, NEW) if int(free[0, k]) not in free[0, :k] and int(free[0, k]) not in free[1])
    eos = int(free[0, step])
    ours, _ = _check(entry, kind, path, ids, padding, do_sample=False, eos_token_id=eos)
    ours = ours[:, ids.shape[1] :]
    assert torch.equal(ours[0, : step + 1], free[0, : step + 1]) and (ours[0, step + 1 :] == 0).all()
    assert torch.equal(ours[1], free[1]) and ours.shape[1] == NEW
    both, _ = _check(entry, kind, path, ids, padding, do_sample=False, eos_token_id=[int(free[0, 1]), int(free[1, 2])])
    assert both.shape[1] - ids.shape[1] <= 3


@needs_both
def test_stop_strings(models, kind, path):
    """A stop string spanning two generated tokens stops its row (transformers needs the tokenizer for it)."""
    entry = models["llama"]
    ids, padding = _batch()
    free = _sequences(_expected(entry, kind, ids, padding, do_sample=False))[:, ids.shape[1] :]
    pieces = TOKENIZER.convert_ids_to_tokens(free[0].tolist())
    step = next(k for k in range(1, NEW - 1) if int(free[0, k]) > 2 and int(free[0, k + 1]) > 2)
    stop = pieces[step][-1] + pieces[step + 1][0]
    ours, _ = _check(entry, kind, path, ids, padding, do_sample=False, stop_strings=[stop], tokenizer=TOKENIZER)
    row = ours[0, ids.shape[1] :]
    assert stop in TOKENIZER.decode(row) and row[-1] == 0  # stopped early, then padded


class Collector(BaseStreamer):
    """Every tensor generate streams, in order."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


@needs_both
def test_streamers(models, kind, path, capsys):
    """A custom streamer gets the prompt, then each step's tokens (a batch of two, sampled); a `TextStreamer`
    prints the text of the new tokens (it takes a batch of one)."""
    entry = models["llama"]
    ids, padding = _batch()
    ours, expected = Collector(), Collector()
    _expected(entry, kind, ids, padding, streamer=expected, **SAMPLING)
    out = _sequences(_run(entry, kind, path, ids, padding, streamer=ours, **SAMPLING))
    assert ours.ends == 1 and torch.equal(ours.puts[0], ids)
    assert torch.equal(torch.stack(ours.puts[1:], 1), out[:, ids.shape[1] :])
    assert len(ours.puts) == len(expected.puts) and all(map(torch.equal, ours.puts, expected.puts))
    single = (ids[1:], padding[1:])
    capsys.readouterr()
    ours, _ = _check(entry, kind, path, *single, do_sample=False, streamer=TextStreamer(TOKENIZER, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed == 2 * (TOKENIZER.decode(ours[0, ids.shape[1] :]) + "\n")  # the reference's, then ours


@needs_both
def test_return_dict_with_scores_logits_and_the_cache(models, kind, path):
    """``return_dict_in_generate`` with processed scores and raw logits (sampling, so top-k leaves -inf in the
    scores): the reference's, to float32 rounding (the oracle's are float64 logits cast by generate); the cache
    returned is the path's, holding every token but the last."""
    ids, padding = _batch()
    options = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, **SAMPLING)
    ours, _ = _check(models["llama"], kind, path, ids, padding, **options)
    assert ours.scores[0].isinf().any()
    cache = output_cache(ours)
    assert type(cache) is (StaticDuoCache if path == "compiled" else DuoCache)
    assert int(cache.get_seq_length()) == ours.sequences.shape[1] - 1


@needs_both
@pytest.mark.parametrize(
    "options", [dict(num_beams=3, num_return_sequences=2, do_sample=False), dict(num_beams=2, do_sample=True)]
)
def test_beam_search(models, kind, path, options):
    """Beam search and beam sampling. transformers' beam search calls the model eagerly at every step (it never
    uses the compiled step), so by default it gets the dynamic `DuoCache` (test_beam_search_by_default_...); asked
    for ``cache_implementation="static"`` (the compiled path here) it decodes eagerly on a `StaticDuoCache`,
    reordered in place. Asserted (no compiled call), so a transformers release that starts compiling beam search
    shows up here."""
    ids, padding = _batch()
    if path == "compiled":
        options = {**options, "cache_implementation": "static"}
    ours, _ = _check(models["llama"], kind, path, ids, padding, eager_steps=True, **options)
    assert ours.shape[0] == 2 * options.get("num_return_sequences", 1)


def test_beam_search_by_default_decodes_on_the_dynamic_cache(models):
    """Where generate would compile but the mode is beam search (never compiled), no static cache is reserved."""
    ids, padding = _batch()
    RECORD.caches.clear()
    _generate(models["llama"].patched["pattern"], ids, padding, num_beams=2, do_sample=False,
              **PATH_OPTIONS["compiled"])  # fmt: skip
    assert RECORD.caches == [DuoCache]


@pytest.mark.parametrize("padded", [False, True])
def test_the_decode_op_passes_opcheck(padded):
    """``duo_attn::decode_attention`` (the op a compiled step calls for both head groups): schema, fake tensor and
    AOT-dispatch checks, GQA, writing into a view of a wider output as the static step does. The quantized op's
    opcheck is in test_quant.py."""
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 1, 16, generator=gen)
    key, value = (torch.randn(2, 2, 24, 16, generator=gen) for _ in range(2))
    key_pos = None
    if padded:
        key_pos = torch.arange(24).repeat(2, 1)
        key_pos[0, :3] = -1
    length = torch.tensor([20], dtype=torch.int32)
    wide = torch.zeros(2, 6, 1, 16)
    args = (query, key, value, length, key_pos, 0.25, wide[:, 1:5])
    torch.library.opcheck(decode_attention_op, args)  # on copies of the arguments
    decode_attention_op(*args)
    assert wide[:, 1:5].abs().sum() > 0 and (wide[:, [0, 5]] == 0).all()  # the op wrote the view, only it


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_on_the_compiled_path_reserves_the_cache_first(models, kind, monkeypatch):
    """With ``prefill_chunk_size`` generate compiles the pre-fill too, so the StaticDuoCache reserves its buffers
    before the first forward (inside a CUDA-graph-captured call they would belong to the graph's pool and be
    overwritten by the next replay); the tokens are the reference's."""
    from duo_attn.kv_cache import StaticDuoCacheLayer

    tokens_at_init: list[int] = []
    original = StaticDuoCacheLayer.lazy_initialization

    def recorded(self, key_states, value_states):
        tokens_at_init.append(key_states.shape[2])
        original(self, key_states, value_states)

    monkeypatch.setattr(StaticDuoCacheLayer, "lazy_initialization", recorded)
    ids, padding = _batch()
    expected = _expected(models["llama"], kind, ids, padding, do_sample=False)
    RECORD.caches.clear()
    compile_config = CompileConfig(backend=_counting_backend, fullgraph=False)  # the pre-fill's planner runs eagerly
    compile_config._compile_all_devices = True
    ours = _generate(models["llama"].patched[kind], ids, padding, do_sample=False, prefill_chunk_size=4,
                     compile_config=compile_config)  # fmt: skip
    assert RECORD.caches == [StaticDuoCache]
    assert tokens_at_init and set(tokens_at_init) == {0}  # every layer reserved before any token was written
    assert torch.equal(_sequences(ours), _sequences(expected))
