"""LongBench metrics on hand-checked examples (expected values derived by hand in the comments)."""

from __future__ import annotations

import pytest

from duo_attn.eval import metrics as m
from duo_attn.eval.longbench import LONGBENCH_TASKS


def test_normalize_answer_english():
    # lower -> drop punctuation -> articles become spaces -> collapse whitespace
    assert m.normalize_answer("The Cat, sat on a mat!") == "cat sat on mat"
    assert m.normalize_answer("  An  apple\tTHE end ") == "apple end"
    # "a" inside a word is not an article
    assert m.normalize_answer("banana") == "banana"


def test_normalize_answer_chinese():
    # Chinese and ASCII punctuation go, every whitespace goes (no re-joining with spaces)
    assert m.normalize_zh_answer("东海。 (East Sea)") == "东海eastsea"
    assert m.normalize_zh_answer("“北京”，天安门！") == "北京天安门"


def test_token_f1():
    # common = {a:1, b:1} -> 2; P = 2/3, R = 2/2; F1 = 2*(2/3)/(5/3) = 0.8
    assert m.token_f1(["a", "b", "c"], ["a", "b"]) == pytest.approx(0.8)
    assert m.token_f1(["x"], ["y"]) == 0.0
    # repeated tokens count with multiplicity: common = min(2,1) = 1; P = 1/2, R = 1 -> 2/3
    assert m.token_f1(["a", "a"], ["a"]) == pytest.approx(2 / 3)


def test_qa_f1_score():
    # pred tokens [cat, sat, on, mat], truth [cat, on, mat]: common 3, P = 3/4, R = 1, F1 = 1.5/1.75 = 6/7
    assert m.qa_f1_score("The cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert m.qa_f1_score("Paris.", "paris") == 1.0
    assert m.qa_f1_score("Paris", "London") == 0.0
    assert m.qa_f1_score("", "London") == 0.0


def test_qa_f1_zh_score():
    # jieba: 我/爱/北京/天安门 vs 北京/天安门: common 2, P = 2/4, R = 2/2, F1 = 2*0.5*1/1.5 = 2/3
    assert m.qa_f1_zh_score("我爱北京天安门", "北京天安门") == pytest.approx(2 / 3)
    # "。" normalises to "" and is dropped, so 东海/。 vs 东海 is a perfect match
    assert m.qa_f1_zh_score("东海。", "东海") == 1.0
    # 答案/是/东海 vs 东海: P = 1/3, R = 1, F1 = (2/3)/(4/3) = 0.5
    assert m.qa_f1_zh_score("答案是东海", "东海") == pytest.approx(0.5)


def test_rouge_score():
    # The rouge package counts *unique* words: hyp {the,cat,sat,on,mat} = 5, ref {the,cat,is,on,mat} = 5,
    # LCS the-cat-on-the-mat as a set {the,cat,on,mat} = 4 -> R = P = 4/5, F = 2PR/(P+R+1e-8) ~= 0.8
    assert m.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    assert m.rouge_score("same words here", "same words here") == pytest.approx(1.0, abs=1e-7)
    # the package raises on empty text (also text that is only "."), LongBench scores that as 0
    assert m.rouge_score("", "reference") == 0.0
    assert m.rouge_score(".", "reference") == 0.0


def test_rouge_zh_score():
    # words 我 爱 北京 天安门 vs 北京 天安门: n = 4, m = 2, LCS 2 -> P = 1/2, R = 1, F = 1/1.5 = 2/3
    assert m.rouge_zh_score("我爱北京天安门", "北京天安门") == pytest.approx(2 / 3, abs=1e-7)
    assert m.rouge_zh_score("", "北京") == 0.0


def test_classification_score():
    classes = ["City", "Country", "Date"]
    # matches [City, Country]; truth among them -> 1/2
    assert m.classification_score("It is a City, or a Country", "City", all_classes=classes) == 0.5
    assert m.classification_score("City", "City", all_classes=classes) == 1.0
    assert m.classification_score("Date", "City", all_classes=classes) == 0.0
    assert m.classification_score("no class named", "City", all_classes=classes) == 0.0
    # a class that is a strict substring of the truth is discarded: [Description, Description of a person] -> 1/1
    person = ["Description", "Description of a person", "Individual"]
    assert m.classification_score("Description of a person", "Description of a person", all_classes=person) == 1.0


def test_classification_score_keeps_longbench_skip_quirk():
    # LongBench removes from the list it iterates: [art, art history, art history museum]; "art" is removed at
    # index 0, the iteration then moves to index 1 = "art history museum" and never looks at "art history",
    # which stays -> matches [art history, art history museum] -> 1/2 (a "clean" version would give 1).
    classes = ["art", "art history", "art history museum"]
    assert m.classification_score("art history museum", "art history museum", all_classes=classes) == 0.5


def test_retrieval_scores():
    # numbers in the prediction [3, 12], one equals 3 -> 1/2
    assert m.retrieval_score("Paragraph 3, or maybe Paragraph 12", "Paragraph 3") == 0.5
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert m.retrieval_zh_score("答案是段落5", "段落5") == 1.0
    # numbers [5, 15] -> 1/2
    assert m.retrieval_zh_score("段落5或段落15", "段落5") == 0.5


def test_count_score():
    # numbers [7, 10], one is 7 -> 1/2
    assert m.count_score("There are 7 unique paragraphs out of 10", "7") == 0.5
    assert m.count_score("7", 7) == 1.0
    assert m.count_score("seven", "7") == 0.0


def test_fuzz_ratio_matches_fuzzywuzzy_pure_python():
    # "abc" vs "abd": 2 matching chars, ratio 2*2/6 = 0.667 -> 67
    assert m.fuzz_ratio("abc", "abd") == 67
    # 1 match in 16 chars -> 12.5, rounded half to even like Python's round -> 12
    assert m.fuzz_ratio("a" + "x" * 7, "a" + "y" * 7) == 12
    assert m.fuzz_ratio("", "") == 100
    assert m.fuzz_ratio("", "a") == 0


def test_code_sim_score():
    # leading blank line stripped, comment and fence lines skipped -> "x = foo(1)";
    # vs "x = foo(2)": 9 of 10 chars match on each side -> 18/20 = 0.9 -> 90 -> 0.9
    pred = "\n# comment\n```python\nx = foo(1)\nprint(x)"
    assert m.code_sim_score(pred, "x = foo(2)") == 0.9
    # "//" comments too; with no usable line the prediction is "" -> 0
    assert m.code_sim_score("// only a comment", "x = 1") == 0.0
    assert m.code_sim_score("y = 2", "y = 2") == 1.0


def test_task_metric_map_covers_longbench():
    assert set(m.TASK_METRICS) == set(LONGBENCH_TASKS)
    assert len(LONGBENCH_TASKS) == 21
    assert m.TASK_METRICS["dureader"] is m.rouge_zh_score
    assert m.TASK_METRICS["lsht"] is m.classification_score
    assert m.TASK_METRICS["passage_retrieval_zh"] is m.retrieval_zh_score
    assert m.TASK_METRICS["repobench-p"] is m.code_sim_score
    assert m.base_task("hotpotqa_e") == "hotpotqa"
    assert m.base_task("hotpotqa") == "hotpotqa"


def test_score_sample_max_over_answers_and_first_line():
    # best of the two answers: "Paris" -> 1.0
    assert m.score_sample("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # trec/triviaqa/samsum/lsht keep only the first line (after leading newlines)
    assert m.score_sample("trec", "\nCity\nQuestion: next", ["City"], ["City", "Date"]) == 1.0
    assert m.score_sample("triviaqa", "Paris\nQuestion: x? Answer: y", ["Paris"]) == 1.0
    # other tasks do not cut: [paris, second, line] vs [paris] -> P = 1/3, R = 1, F1 = 0.5
    assert m.score_sample("hotpotqa", "Paris\nsecond line", ["Paris"]) == pytest.approx(0.5)
    assert m.score_sample("hotpotqa_e", "Paris", ["Paris"]) == 1.0
    with pytest.raises(ValueError, match="unknown LongBench task"):
        m.score_sample("nope", "x", ["x"])


def test_score_task_rounding_and_buckets():
    preds, answers = ["Paris", "Rome", "Oslo"], [["Paris"], ["Paris"], ["Oslo"]]
    # scores 1, 0, 1 -> 200/3 = 66.666.. -> 66.67
    assert m.score_task("hotpotqa", preds, answers) == 66.67
    buckets = m.score_task_by_length("hotpotqa", preds, answers, [100, 5000, 9000])
    assert buckets == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    # boundaries: 3999 -> 0-4k, 4000 -> 4-8k, 8000 -> 8k+; empty bucket -> None
    assert m.score_task_by_length("hotpotqa", preds[:2], answers[:2], [3999, 4000]) == {
        "0-4k": 100.0,
        "4-8k": 0.0,
        "8k+": None,
    }
    assert m.score_task_by_length("hotpotqa", ["Paris"], [["Paris"]], [8000])["8k+"] == 100.0
