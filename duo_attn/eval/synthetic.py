"""Offline synthetic long-context tasks in the spirit of RULER, generated at exact token lengths and scored exactly.

Why: LongBench needs its data files and mixes retrieval with reasoning and summary quality; these tasks need no
download, can be made at any length (measured with the model's own tokenizer, chat template included) and tell
directly whether a compressed KV cache still finds and tracks facts spread over the context.

Tasks:

* ``niah_single``: one "special number" needle for one key hidden in filler text; return the number.
* ``niah_multikey``: four needles with different keys; return the number of the key asked for.
* ``niah_multivalue``: four needles for the same key; return all four numbers.
* ``vt``: variable tracking; a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... (plus a distractor chain with another
  value) spread through filler; return every variable that holds the value.
* ``cwe``: common-word extraction; a numbered list where ten words occur far more often than the others; return them.

The score of a prediction is the fraction of expected strings it contains, case-insensitively (RULER's
string-match-all). Everything is deterministic for a given seed, task, length and sample index.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..learn.haystack import load_haystack
from ..models import DTYPES, MODEL_HELP, SMOLLM2, load_model
from ..patch import disable_duo_attention
from .harness import (
    METHOD_KINDS,
    Method,
    build_methods,
    encode_prompt,
    generate_greedy,
    has_chat_template,
    window_sizes,
)
from .report import FLOOR_HELP, RANDOM_SEEDS_HELP, floor_arg

SYNTHETIC_TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")

# New-token budgets: enough for the answer sentence of each task (cwe lists ten words, vt five names).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "niah_single": 32,
    "niah_multikey": 32,
    "niah_multivalue": 64,
    "vt": 48,
    "cwe": 120,
}

# Default haystack: plain, repetitive sentences that contain no numbers and no task vocabulary.
FILLER_SENTENCES: tuple[str, ...] = (
    "The river ran slowly past the old stone bridge.",
    "A small boat waited at the edge of the quiet harbour.",
    "Morning light spread across the fields and the low hills.",
    "The market opened early and the stalls filled with fresh bread.",
    "Children walked to school along the narrow path by the wall.",
    "In the evening the wind turned cold and the windows were closed.",
    "The library kept its oldest maps in a room under the stairs.",
    "A train crossed the valley twice a day, always on time.",
)

_NEEDLES_PER_SAMPLE = 4  # keys in niah_multikey, values in niah_multivalue
_VT_HOPS = 4  # a chain of 5 variables
_CWE_TOP_K = 10
# (frequency of each common word, frequency of each rare word), tried in order until the common words fit.
_CWE_FREQUENCIES = ((30, 3), (20, 3), (10, 3), (5, 1), (3, 1))
_UNIT_MAX_WORDS = 30


@dataclass(frozen=True)
class SyntheticSample:
    """One generated prompt: ``input_ids`` are ready for ``generate``, ``text`` is what was tokenised."""

    task: str
    target_length: int
    input_ids: list[int]
    text: str
    answers: list[str]

    def score(self, prediction: str) -> float:
        """Fraction of the expected answers found in ``prediction`` (0..1)."""
        return string_match_all(prediction, self.answers)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string-match-all for one sample: share of answers that occur in the prediction, ignoring case."""
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string-match-part for one sample: 1 if any answer occurs in the prediction, ignoring case."""
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


def _filler_units(haystack: str | None) -> list[str]:
    """Cut the haystack into sentence-sized pieces (at . ! ? or every 30 words) that needles go between."""
    if haystack is None:
        return list(FILLER_SENTENCES)
    units, current = [], []
    for word in haystack.split():
        current.append(word)
        if word[-1] in ".!?" or len(current) >= _UNIT_MAX_WORDS:
            units.append(" ".join(current))
            current = []
    if current:
        units.append(" ".join(current))
    if not units:
        raise ValueError("the haystack text is empty")
    return units


def _pseudo_words(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """Distinct pronounceable non-words (so that no answer can be guessed from world knowledge)."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _number(rng: random.Random, taken: set[str], digits: int = 7) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def _weave(units: list[str], n_units: int, needles: Sequence[tuple[float, str]]) -> str:
    """First ``n_units`` filler units (cycled) with each needle placed at its relative depth, in the given order."""
    body = [units[i % len(units)] for i in range(n_units)]
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        slots.setdefault(round(depth * n_units), []).append(needle)
    pieces: list[str] = []
    for position in range(n_units + 1):
        pieces.extend(slots.get(position, []))
        if position < n_units:
            pieces.append(body[position])
    return " ".join(pieces)


@dataclass(frozen=True)
class _Spec:
    """A task instance whose context grows with one integer (filler units, or rare words for cwe)."""

    render: Callable[[int], str]
    answer_prefix: str
    answers: list[str]


_NIAH_INTRO = (
    "Some special numbers are hidden in the text below. Remember them: you will be asked about one of them afterwards."
)


def _niah_spec(task: str, rng: random.Random, units: list[str]) -> _Spec:
    taken: set[str] = set()
    if task == "niah_single":
        keys = ["-".join(_pseudo_words(rng, 2))]
        pairs = [(keys[0], _number(rng, taken))]
    elif task == "niah_multikey":
        words = _pseudo_words(rng, 2 * _NEEDLES_PER_SAMPLE)
        keys = ["-".join(words[i : i + 2]) for i in range(0, len(words), 2)]
        pairs = [(key, _number(rng, taken)) for key in keys]
    else:
        keys = ["-".join(_pseudo_words(rng, 2))]
        pairs = [(keys[0], _number(rng, taken)) for _ in range(_NEEDLES_PER_SAMPLE)]
    needles = [(rng.random(), f"The special number for {key} is {value}.") for key, value in pairs]
    key = keys[0]
    if task == "niah_multivalue":
        question = f"What are all the special numbers for {key} mentioned in the text above?"
        prefix = f"The special numbers for {key} mentioned in the text above are"
        answers = [value for _, value in pairs]
    else:
        question = f"What is the special number for {key} mentioned in the text above?"
        prefix = f"The special number for {key} mentioned in the text above is"
        answers = [pairs[0][1]]

    def render(n_units: int) -> str:
        return f"{_NIAH_INTRO}\n\n{_weave(units, n_units, needles)}\n\n{question}"

    return _Spec(render, prefix, answers)


def _vt_spec(rng: random.Random, units: list[str]) -> _Spec:
    taken: set[str] = set()
    names: set[str] = set()
    chains = []
    for _ in range(2):  # the chain asked about and one distractor chain
        value = _number(rng, taken, digits=5)
        chain = []
        while len(chain) < _VT_HOPS + 1:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.add(name)
                chain.append(name)
        statements = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))
        ]
        # sorted depths keep every chain in assignment order wherever it lands
        chains.append((value, chain, list(zip(sorted(rng.random() for _ in statements), statements, strict=True))))
    needles = sorted(chains[0][2] + chains[1][2], key=lambda pair: pair[0])
    value, answers = chains[0][0], chains[0][1]
    intro = "Memorize and track the chains of variable assignments hidden in the following text."
    question = f"Find all variables that are assigned the value {value} in the text above."

    def render(n_units: int) -> str:
        return f"{intro}\n\n{_weave(units, n_units, needles)}\n\n{question}"

    return _Spec(render, f"The variables assigned the value {value} are:", answers)


def _cwe_spec(rng: random.Random, measure_words: Callable[[_Spec], int], target: int) -> tuple[_Spec, int]:
    """The word-list spec and how many rare words it has available."""
    common = _pseudo_words(rng, _CWE_TOP_K)
    shuffle_seed = rng.random()
    question = f"What are the {_CWE_TOP_K} most common words in the list above?"
    prefix = f"The {_CWE_TOP_K} most common words in the list above are:"

    def spec_for(freq_common: int, freq_rare: int, rare: list[str]) -> _Spec:
        def render(n_rare: int) -> str:
            words = common * freq_common + rare[:n_rare] * freq_rare
            random.Random(f"{shuffle_seed}:{n_rare}").shuffle(words)
            listing = "\n".join(f"{i}. {word}" for i, word in enumerate(words, 1))
            return f"Below is a numbered list of words.\n\n{listing}\n\n{question}"

        return _Spec(render, prefix, list(common))

    for freq_common, freq_rare in _CWE_FREQUENCIES:
        # more rare words than the budget can hold: every list line costs at least two tokens (number and word)
        rare = _pseudo_words(rng, target // (2 * freq_rare) + 1, exclude=set(common))
        spec = spec_for(freq_common, freq_rare, rare)
        if measure_words(spec) <= target:
            return spec, len(rare)
    raise ValueError(f"target length {target} is too short for the cwe word list")


def _fit(measure: Callable[[int], int], target: int, max_size: int | None = None) -> int:
    """Largest context size whose prompt has at most ``target`` tokens (token count grows with the size)."""
    base = measure(0)
    if base > target:
        raise ValueError(f"target length {target} is shorter than the bare prompt ({base} tokens)")
    probe = 16
    per_unit = max((measure(probe) - base) / probe, 0.5)
    guess = max(1, int((target - base) / per_unit))
    if measure(guess) <= target:
        lo, hi = guess, int(guess * 1.1) + 1
        while measure(hi) <= target:
            if max_size is not None and hi > max_size:
                raise ValueError(f"could not fill {target} tokens: the content ran out")
            lo, hi = hi, int(hi * 1.1) + 1
    else:
        lo, hi = int(guess * 0.9), guess
        while lo > 0 and measure(lo) > target:
            lo, hi = int(lo * 0.9), lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def make_sample(
    task: str,
    tokenizer: Any,
    length: int,
    *,
    seed: int = 0,
    index: int = 0,
    haystack: str | None = None,
) -> SyntheticSample:
    """Build sample ``index`` of ``task`` with a prompt of at most ``length`` tokens, as close to it as the filler
    granularity allows (one filler sentence, or one rare word for cwe).

    ``haystack`` is any text to hide the needles in (cycled when too short); by default a few generic sentences.
    cwe ignores it: its context is the word list itself.
    The prompt is a user turn under the tokenizer's chat template when it has one, and the answer's first words
    are given after it (as RULER does), so even base models answer in a checkable form.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    chat = has_chat_template(tokenizer)

    def encode(spec: _Spec, size: int) -> list[int]:
        suffix = spec.answer_prefix if chat else "\n" + spec.answer_prefix
        return encode_prompt(tokenizer, spec.render(size), chat=chat, assistant_prefix=suffix)

    max_size = None
    if task == "cwe":
        spec, max_size = _cwe_spec(rng, lambda s: len(encode(s, 0)), length)
    elif task == "vt":
        spec = _vt_spec(rng, _filler_units(haystack))
    else:
        spec = _niah_spec(task, rng, _filler_units(haystack))
    ids = encode(spec, _fit(lambda n: len(encode(spec, n)), length, max_size))
    return SyntheticSample(task, length, ids, tokenizer.decode(ids), list(spec.answers))


def make_samples(
    task: str, tokenizer: Any, length: int, n_samples: int, *, seed: int = 0, haystack: str | None = None
) -> list[SyntheticSample]:
    """``n_samples`` independent samples of one task at one length."""
    return [make_sample(task, tokenizer, length, seed=seed, index=i, haystack=haystack) for i in range(n_samples)]


def run_synthetic_suite(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    n_samples: int = 10,
    max_new_tokens: int | None = None,
    chunk_size: int | None = None,
    *,
    seed: int = 0,
    haystack: str | None = None,
    deadline: float | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, dict[int, float]]:
    """Greedy-decode every task at every length; returns ``{task: {length: score}}`` with scores in 0-100.

    A score is the mean of :func:`string_match_all` over the samples, x100 and rounded to 2 decimals.
    ``max_new_tokens`` overrides the per-task budgets; ``chunk_size`` prefills prompts in chunks of that many tokens.
    ``deadline`` (a `time.perf_counter` value) stops the run before the next sample once passed; only the
    (task, length) entries whose every sample was scored are returned. ``records`` receives one dict per sample
    scored (task, length, index, prompt tokens, answers, prediction, score, seconds), so that methods can be compared
    sample by sample.
    """
    unknown = [task for task in tasks if task not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; known: {', '.join(SYNTHETIC_TASKS)}")
    model.eval()
    results: dict[str, dict[int, float]] = {task: {} for task in tasks}
    progress = tqdm(total=len(tasks) * len(lengths) * n_samples, desc="synthetic", unit="sample")
    for task in tasks:
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
        for length in lengths:
            total = 0.0
            for index, sample in enumerate(
                make_samples(task, tokenizer, length, n_samples, seed=seed, haystack=haystack)
            ):
                if deadline is not None and time.perf_counter() >= deadline:
                    progress.close()
                    return results
                started = time.perf_counter()
                prediction = generate_greedy(model, tokenizer, sample.input_ids, budget, chunk_size=chunk_size)
                score = sample.score(prediction)
                total += score
                if records is not None:
                    records.append({
                        "task": task, "length": length, "index": index, "prompt_tokens": len(sample.input_ids),
                        "answers": sample.answers, "prediction": prediction, "score": score,
                        "seconds": round(time.perf_counter() - started, 3),
                    })  # fmt: skip
                progress.update()
            results[task][length] = round(100 * total / n_samples, 2)
    progress.close()
    return results


def format_synthetic_table(results: dict[str, dict[int, float]]) -> str:
    """Markdown table: one row per task, one column per length, and a row with the mean over tasks."""
    lengths = sorted({length for scores in results.values() for length in scores})
    header = "| task | " + " | ".join(str(n) for n in lengths) + " |"
    lines = [header, "|" + "---|" * (len(lengths) + 1)]
    for task, scores in results.items():
        cells = [f"{scores[n]:.2f}" if n in scores else "-" for n in lengths]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = []
    for n in lengths:  # an average over only some tasks (a run cut short) would not compare: left out
        values = [scores[n] for scores in results.values() if n in scores]
        means.append(f"{sum(values) / len(values):.2f}" if len(values) == len(results) else "-")
    lines.append("| **average** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn synthetic",
        description="Offline RULER-style tasks (single/multi-key and multi-value needles, variable tracking, common "
        "words) at exact token lengths, scored by string match (0-100), under full attention, DuoAttention patterns "
        "and all-streaming heads. Writes results.json and summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=SMOLLM2, help=MODEL_HELP)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument("--pattern", help="pattern directory for the 'duo' method (and the default window sizes)")
    parser.add_argument("--baseline-pattern", help="a second pattern, e.g. training-free scores (method 'baseline')")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                        help="fractions of KV heads made streaming, one 'duo' / 'baseline' / 'random' method each")
    parser.add_argument("--min-retrieval-per-layer", type=floor_arg, default=0, metavar="N", help=FLOOR_HELP)
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHOD_KINDS),
                        help="default: full duo streaming with --pattern, else full streaming")  # fmt: skip
    parser.add_argument("--sink", type=int, default=None, help="streaming sink size (default: the pattern's, else 64)")
    parser.add_argument("--recent", type=int, default=None,
                        help="streaming recent window (default: the pattern's, else 256)")  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048], help="prompt lengths (tokens)")
    parser.add_argument("--tasks", nargs="*", default=list(SYNTHETIC_TASKS), choices=list(SYNTHETIC_TASKS),
                        help="tasks to run")  # fmt: skip
    parser.add_argument("--n-samples", type=int, default=5, help="samples per task and length")
    parser.add_argument("--chunk-size", type=int, default=1024, help="pre-fill chunk size (tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0], help=RANDOM_SEEDS_HELP)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/synthetic"), help="where the report goes")
    parser.add_argument("--time-limit-minutes", type=float,
                        help="stop after this long (loading included) and report what was scored; lengths run in "
                             "the order given, every method at one before the next")  # fmt: skip
    return parser


def write_synthetic_report(
    output_dir: Path,
    config: dict[str, Any],
    methods: Sequence[Method],
    results: dict[str, dict[str, dict[int, float]]],
    samples: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write ``results.json`` (config, methods, scores, and each method's per-sample records when given) and
    ``summary.md`` (one table per method) and print the tables; returns what results.json holds."""
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {"config": config, "methods": [m.describe() for m in methods], "scores": results}
    if samples is not None:
        report["samples"] = samples
    (output_dir / "results.json").write_text(json.dumps(report, indent=1))
    tables = [
        f"## {name} ({m.retrieval_heads} retrieval heads)\n\n"
        + (format_synthetic_table(results[name]) if any(results[name].values()) else "not run (time limit)\n")
        for name, m in zip(results, methods)
    ]
    header = "# Synthetic suite (string match, 0-100)\n\n"
    planned, done = config.get("entries_planned"), config.get("entries_done")
    if planned is not None and done is not None and done < planned:
        header += f"**Incomplete**: the time limit stopped the run after {done} of {planned} (method, task, length) "
        header += "entries.\n\n"
    summary = header + "\n\n".join(tables) + "\n"
    (output_dir / "summary.md").write_text(summary)
    print("\n\n".join(tables))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the suite under full attention, duo at given sparsities and all-streaming heads; write results.json and
    summary.md."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    kinds = args.methods or (["full", "duo", "streaming"] if args.pattern else ["full", "streaming"])
    patterns = {"duo": ("--pattern", args.pattern), "baseline": ("--baseline-pattern", args.baseline_pattern)}
    for kind, (flag, value) in patterns.items():
        if kind in kinds and value is None:
            parser.error(f"method {kind!r} needs {flag}")

    started = time.perf_counter()
    deadline = None if args.time_limit_minutes is None else started + 60.0 * args.time_limit_minutes
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    sink, recent = window_sizes(args.pattern or args.baseline_pattern, args.sink, args.recent)
    methods = build_methods(
        model.config, kinds, sparsities=args.sparsities, sink_size=sink, recent_size=recent, pattern=args.pattern,
        baseline_pattern=args.baseline_pattern, random_seeds=args.random_seeds,
        min_retrieval_per_layer=args.min_retrieval_per_layer,
    )  # fmt: skip
    haystack = load_haystack(None)
    results: dict[str, dict[str, dict[int, float]]] = {m.name: {task: {} for task in args.tasks} for m in methods}
    samples: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    try:
        for length in args.lengths:  # every method at one length before the next: a cut-short run still compares
            for method in methods:
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                method.apply(model)
                scores = run_synthetic_suite(
                    model, tokenizer, [length], args.tasks, args.n_samples, chunk_size=args.chunk_size,
                    seed=args.seed, haystack=haystack, deadline=deadline, records=samples[method.name],
                )  # fmt: skip
                for task, by_length in scores.items():
                    results[method.name][task].update(by_length)
    finally:
        if getattr(model, "duo_attention", None) is not None:
            disable_duo_attention(model)
    done = sum(len(by_length) for by_task in results.values() for by_length in by_task.values())
    planned = len(methods) * len(args.tasks) * len(args.lengths)
    config = vars(args) | {"output_dir": str(args.output_dir), "total_seconds": time.perf_counter() - started,
                           "entries_planned": planned, "entries_done": done}  # fmt: skip
    return write_synthetic_report(args.output_dir, config, methods, results, samples)


if __name__ == "__main__":
    main()
