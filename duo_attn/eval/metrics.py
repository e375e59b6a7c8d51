"""LongBench's scoring functions, reimplemented so that scores are comparable with published LongBench numbers.

Every function follows the behaviour of the LongBench authors' evaluation code (THUDM/LongBench, ``metrics.py`` and
``eval.py``), quirks included, because a "cleaner" metric would make our numbers incomparable with the paper's:

* answers are normalised before token F1 (English: lowercase, drop ASCII punctuation and the articles a/an/the,
  collapse whitespace; Chinese: lowercase, drop ASCII and CJK punctuation, delete all whitespace);
* Chinese text is segmented with jieba in precise mode (``cut_all=False``);
* ROUGE-L is the F value of the ``rouge`` PyPI package with its defaults, and any error it raises (empty text) is
  scored 0;
* code similarity is difflib's ``SequenceMatcher`` ratio rounded to a whole percent, which is what fuzzywuzzy's
  ``fuzz.ratio`` computes on its pure-Python path.

``jieba`` and ``rouge`` are imported on first use so that English-only and non-ROUGE scoring works without them.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "TASK_METRICS",
    "FIRST_LINE_TASKS",
    "LENGTH_BUCKETS",
    "normalize_answer",
    "normalize_zh_answer",
    "token_f1",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "code_sim_score",
    "fuzz_ratio",
    "score_sample",
    "score_task",
    "score_task_by_length",
    "base_task",
]

# Chinese/full-width punctuation that LongBench strips in addition to ``string.punctuation`` (its list, verbatim).
_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"
    "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.cache
def _jieba() -> Any:
    """Import jieba once, silencing its dictionary-loading chatter on stderr."""
    try:
        import jieba
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Chinese LongBench metrics need jieba: pip install 'duo-attn[eval]'") from err
    jieba.setLogLevel(logging.WARNING)
    return jieba


@functools.cache
def _rouge() -> Any:
    """One shared ``rouge.Rouge`` (stateless, so sharing it is safe)."""
    try:
        from rouge import Rouge
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ROUGE-based LongBench metrics need rouge: pip install 'duo-attn[eval]'") from err
    return Rouge()


def _jieba_words(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """English answer normalisation (SQuAD style, as LongBench applies it)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese answer normalisation: no punctuation (ASCII or CJK), no whitespace at all."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when they share nothing)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """English QA F1 over whitespace tokens of the normalised strings."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Chinese QA F1 over jieba words, each normalised, empty words dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 when it refuses the input (e.g. an empty prediction)."""
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench scores every failure as 0 (empty text, recursion on huge inputs)
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F on jieba words joined by spaces (the rouge package splits on whitespace)."""
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str], **_: Any) -> float:
    """1/len(matches) when the true class is among the class names found (as substrings) in the prediction.

    Class names that are strict substrings of the ground truth are then discarded as matches. LongBench does this
    by removing items from the list it is iterating over, which skips the element right after each removal; the
    index walk below reproduces that skipping on purpose so that scores match LongBench's exactly.
    """
    matches = [name for name in all_classes if name in prediction]
    index = 0
    while index < len(matches):
        term = matches[index]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        index += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Fraction of the numbers in the prediction that equal N of the ground truth's "Paragraph N"."""
    return _fraction_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Chinese variant of :func:`retrieval_score`, for ground truths of the form "段落N"."""
    return _fraction_equal(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Fraction of the numbers in the prediction that equal the ground-truth count."""
    return _fraction_equal(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """Similarity in whole percent, as fuzzywuzzy's pure-Python ``fuzz.ratio``: identical -> 100, one empty -> 0."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Edit similarity of the first predicted line that is not a comment or a code fence (no ``` # //)."""
    first = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return fuzz_ratio(first, ground_truth) / 100


TASK_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Few-shot tasks whose prediction LongBench cuts at the first newline: the model tends to continue with another
# made-up example after its answer.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

LENGTH_BUCKETS: tuple[tuple[str, float], ...] = (("0-4k", 4000), ("4-8k", 8000), ("8k+", float("inf")))


def base_task(task: str) -> str:
    """Map a LongBench-E name (``hotpotqa_e``) to its LongBench task; other names pass through unchanged."""
    if task not in TASK_METRICS and task.endswith("_e") and task[:-2] in TASK_METRICS:
        return task[:-2]
    return task


def score_sample(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """Score in [0, 1] of one prediction: the best metric value over all ground-truth answers."""
    name = base_task(task)
    try:
        metric = TASK_METRICS[name]
    except KeyError:
        raise ValueError(f"unknown LongBench task {task!r}; known: {sorted(TASK_METRICS)}") from None
    if name in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return best


def score_task(
    task: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[Sequence[str] | None] | None = None,
) -> float:
    """Task score as LongBench reports it: mean sample score x 100, rounded to 2 decimals."""
    if not predictions:
        raise ValueError(f"no predictions to score for {task}")
    classes = all_classes if all_classes is not None else [None] * len(predictions)
    total = sum(score_sample(task, p, a, c) for p, a, c in zip(predictions, answers, classes, strict=True))
    return round(100 * total / len(predictions), 2)


def score_task_by_length(
    task: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lengths: Sequence[int],
    all_classes: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, float | None]:
    """LongBench-E style scores per context-length bucket (0-4k, 4-8k, 8k+ of LongBench's ``length`` field).

    An empty bucket is ``None`` (LongBench's numpy mean would give NaN, which JSON cannot hold).
    """
    classes = all_classes if all_classes is not None else [None] * len(predictions)
    buckets: dict[str, list[float]] = {name: [] for name, _ in LENGTH_BUCKETS}
    for p, a, n, c in zip(predictions, answers, lengths, classes, strict=True):
        name = next(bucket for bucket, upper in LENGTH_BUCKETS if n < upper)
        buckets[name].append(score_sample(task, p, a, c))
    return {name: round(100 * sum(s) / len(s), 2) if s else None for name, s in buckets.items()}
