"""Scorers against hand-computed cases: the VQA normalisation quirks, each benchmark's parsing rules,
the join's refusals, and `dpn eval score` end to end. Expected numbers are derived in the comments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpn.eval.scoring import (
    SCORERS,
    EvalDataError,
    load_jsonl,
    mmbench_parse,
    mme_parse,
    pope_parse,
    primary_metric,
    scienceqa_parse,
    score,
    score_files,
)
from dpn.eval.vqa_normalize import (
    evalai_normalize,
    leave_one_out_accuracy,
    process_digit_article,
    process_punctuation,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_accuracy,
)

REPO = Path(__file__).resolve().parents[1]


def preds(*pairs):
    return [{"question_id": q, "text": t} for q, t in pairs]


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),  # ... including "none"
        ("the cat.", "cat"),  # article dropped, final period dropped
        ("A cat", "cat"),
        ("dont", "don't"),  # contraction table
        ("don't", "don't"),  # already contracted: untouched ("'" is not punctuation)
        ("1,000", "1000"),  # the EvalAI processor deletes commas outright
        ("2.5", "2.5"),  # a period before a digit survives
        ("2.5.", "2.5"),  # ... the final one does not
        ("Yes!", "yes"),
        ("t-shirt", "t shirt"),  # '-' touching no space becomes a space
        ("left - right", "left right"),  # ' -' touches a space: deleted, then whitespace collapsed
        ("The dog's bone?", "dog 's bone"),  # "'s" split off, '?' deleted
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_evalai_normalize(raw, expected):
    assert evalai_normalize(raw) == expected


def test_official_punctuation_rules():
    # A digit comma anywhere switches every punctuation mark to deletion.
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("a,b (1,2)") == "ab 12"
    # Without one, an untouched mark becomes a space.
    assert process_punctuation("a,b") == "a b"
    # The originals pass re.UNICODE (32) as `count`: at most 32 periods go. 40 - 32 = 8 remain.
    assert process_punctuation("." * 40) == "." * 8
    assert process_digit_article("The Two Cats") == "2 cats"


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_with_10_annotators(k, expected):
    # k matching answers among 10. Leaving out a matching one (k cases) leaves k-1 matches, a
    # non-matching one (10-k cases) leaves k: acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
    # k=1: 9*(1/3)/10 = 0.3; k=2: (2/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7)/10 = 0.9; k=4: 1.
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert leave_one_out_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_processes_only_when_annotators_disagree():
    # Unanimous answers: compared raw, so a capitalised prediction fails on its own ...
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # ... which is why LLaVA runs the EvalAI processor first.
    assert vqa_accuracy(evalai_normalize("Yes"), ["yes"] * 10) == 1.0
    # Disagreeing answers are processed on both sides: "Two" and "2 " both become "2".
    assert vqa_accuracy("Two", ["2 "] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vizwiz_compares_with_raw_annotator_answers():
    assert vizwiz_accuracy(evalai_normalize("Unanswerable"), ["unanswerable"] * 10) == 1.0
    # Annotator answers are not normalised: a capitalised one never matches.
    assert vizwiz_accuracy(evalai_normalize("Unanswerable"), ["Unanswerable"] * 10) == 0.0
    # The prediction is: "two" -> "2".
    assert vizwiz_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)


def test_textvqa_normalises_annotator_answers():
    # "Nike." and "NIKE" normalise to "nike": 4 matches -> 1.0; 3 of them -> 0.9.
    assert textvqa_accuracy("nike", ["Nike.", "NIKE", "nike", "nike"] + ["adidas"] * 6) == 1.0
    assert textvqa_accuracy("Nike!", ["Nike.", "NIKE", "nike"] + ["adidas"] * 7) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------


def test_vqav2():
    gt = [
        {"question_id": 1, "answers": ["2"] * 10},
        {"question_id": 2, "answers": ["cat"] * 2 + ["dog"] * 8},
        {"question_id": 3, "answers": ["don't know"] * 3 + ["no"] * 7},
        {"question_id": 4, "answers": ["1000"] * 10},
    ]
    p = preds((1, "Two"), (2, "the cat."), (3, "dont know"), (4, "1,000"))
    # q1: "Two" -> "2", unanimous -> 1.0; q2: "cat", 2 matches -> 0.6;
    # q3: "dont know" -> "don't know", 3 matches -> 0.9; q4: "1,000" -> "1000" -> 1.0.
    # (1 + 0.6 + 0.9 + 1) / 4 = 0.875
    assert score("vqav2", p, gt) == {"accuracy": pytest.approx(87.5)}


def test_vizwiz_and_textvqa_scores():
    gt = [{"question_id": "a", "answers": ["unanswerable"] * 10}, {"question_id": "b", "answers": ["red"] * 10}]
    # a: 1.0, b: "Red." -> "red" -> 1.0 ... and "blue" -> 0: (1 + 0) / 2 = 50
    assert score("vizwiz", preds(("a", "Unanswerable"), ("b", "blue")), gt) == {"accuracy": pytest.approx(50.0)}
    assert score("textvqa", preds(("a", "unanswerable"), ("b", "Red.")), gt) == {"accuracy": pytest.approx(100.0)}
    with pytest.raises(EvalDataError, match=r"question_id 'a'.*9 answers.*exactly 10"):
        score("textvqa", preds(("a", "x")), [{"question_id": "a", "answers": ["x"] * 9}])


def test_gqa():
    gt = [{"question_id": str(i), "answer": a} for i, a in enumerate(["yes", "left", "left", "yes", "no"])]
    # "Yes." -> "yes" right; "Left" -> "left" right; "the left" wrong (no article stripping);
    # "yes.." -> every trailing period goes -> right; "no " wrong (no whitespace stripping). 3 / 5.
    p = preds(("0", "Yes."), ("1", "Left"), ("2", "the left"), ("3", "yes.."), ("4", "no "))
    assert score("gqa", p, gt) == {"accuracy": pytest.approx(60.0)}


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no cat.", "no"),
        ("There is no cat", "no"),
        ("not sure", "no"),
        ("NO", "yes"),  # only "No", "no", "not" count
        ("Yes. But no.", "yes"),  # only the first sentence counts
        ("no.", "no"),
        ("", "yes"),
    ],
)
def test_pope_parse(text, parsed):
    assert pope_parse(text) == parsed


def test_pope():
    gt = [
        {"question_id": 1, "answer": "yes", "category": "random"},
        {"question_id": 2, "answer": "no", "category": "random"},
        {"question_id": 3, "answer": "no", "category": "random"},
        {"question_id": 4, "answer": "yes", "category": "random"},
        {"question_id": 5, "answer": "yes", "category": "random"},
        {"question_id": 6, "answer": "no", "category": "random"},
        {"question_id": 7, "answer": "yes", "category": "adversarial"},
        {"question_id": 8, "answer": "no", "category": "adversarial"},
    ]
    p = preds(
        (1, "Yes, there is a dog in the image."),  # TP
        (2, "No, there is no cat."),  # TN
        (3, "There is a cat."),  # FP
        (4, "not sure"),  # FN
        (5, "Yes"),  # TP
        (6, "Yes"),  # FP
        (7, "NO"),  # parsed yes: TP
        (8, "no."),  # TN
    )
    # random: TP 2, TN 1, FP 2, FN 1 (n 6): acc 3/6, precision 2/4, recall 2/3,
    # f1 = 2 * 0.5 * 2/3 / (0.5 + 2/3) = 4/7, yes_ratio 4/6.
    # adversarial: TP 1, TN 1: acc, precision, recall, f1 all 1; yes_ratio 1/2.
    out = score("pope", p, gt)
    assert list(out) == ["adversarial", "random", "overall"]
    assert out["random"] == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 200 / 3, "f1": 400 / 7, "yes_ratio": 200 / 3}
    )
    assert out["adversarial"] == pytest.approx(
        {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0}
    )
    # overall: each metric's mean over the two categories present.
    assert out["overall"] == pytest.approx({
        "accuracy": 75.0, "precision": 75.0, "recall": (200 / 3 + 100) / 2, "f1": (400 / 7 + 100) / 2,
        "yes_ratio": (200 / 3 + 50) / 2,
    })
    # Headline: the overall F1 = (400/7 + 100) / 2.
    assert primary_metric("pope", out) == pytest.approx((400 / 7 + 100) / 2)


def test_pope_overall_is_the_unweighted_mean_of_the_three_splits():
    """Papers report POPE as the mean over adversarial / popular / random: each split weighs the same,
    whatever its size (pooling the counts would give 8/12 = 66.67 accuracy here, not 62.5)."""
    gt, p = [], []
    # adversarial: 2 questions, both right (acc 100). popular: 2, both wrong (acc 0). random: 8, 7 right.
    layout = {"adversarial": [("yes", "Yes"), ("no", "No")], "popular": [("yes", "No"), ("no", "Yes")],
              "random": [("yes", "Yes")] * 4 + [("no", "No")] * 3 + [("no", "Yes")]}
    for category, rows in layout.items():
        for label, text in rows:
            qid = len(gt) + 1
            gt.append({"question_id": qid, "answer": label, "category": category})
            p.append({"question_id": qid, "text": text})
    out = score("pope", p, gt)
    # random: TP 4, TN 3, FP 1: acc 7/8, precision 4/5, recall 1, f1 8/9, yes ratio 5/8.
    # popular: TP 0, FN 1, FP 1: precision = recall = f1 = 0, yes ratio 1/2.
    assert out["random"] == pytest.approx(
        {"accuracy": 87.5, "precision": 80.0, "recall": 100.0, "f1": 800 / 9, "yes_ratio": 62.5})
    assert out["overall"] == pytest.approx({
        "accuracy": (100 + 0 + 87.5) / 3, "precision": (100 + 0 + 80) / 3, "recall": (100 + 0 + 100) / 3,
        "f1": (100 + 0 + 800 / 9) / 3, "yes_ratio": (50 + 50 + 62.5) / 3,
    })
    assert primary_metric("pope", out) == pytest.approx(out["overall"]["f1"])
    with pytest.raises(EvalDataError, match=r"question_id 1: POPE category 'overall' is reserved"):
        score("pope", preds((1, "yes")), [{"question_id": 1, "answer": "yes", "category": "overall"}])


def test_pope_no_predicted_yes_and_bad_label():
    # No predicted yes and no actual yes: precision/recall/F1 are 0 (LLaVA's script divides by zero).
    out = score("pope", preds((1, "No")), [{"question_id": 1, "answer": "no", "category": "popular"}])
    only = {"accuracy": 100.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert out == {"popular": only, "overall": only}
    with pytest.raises(EvalDataError, match=r"question_id 1.*'Yes'.*'yes' or 'no'"):
        score("pope", preds((1, "No")), [{"question_id": 1, "answer": "Yes", "category": "popular"}])


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("Not sure", "no"), ("The answer is no", "other"),
     ("none", "no"), ("", "other")],
)
def test_mme_parse(text, parsed):
    assert mme_parse(text) == parsed


def test_mme_acc_plus_needs_both_questions_of_an_image():
    gt = [
        {"question_id": "existence/1.png#0", "image": "existence/1.png", "category": "existence", "answer": "Yes"},
        {"question_id": "existence/1.png#1", "image": "existence/1.png", "category": "existence", "answer": "No"},
        {"question_id": "existence/2.png#0", "image": "existence/2.png", "category": "existence", "answer": "Yes"},
        {"question_id": "existence/2.png#1", "image": "existence/2.png", "category": "existence", "answer": "No"},
        {"question_id": "code/3#0", "image": "code_reasoning/3.png", "category": "code_reasoning", "answer": "Yes"},
        {"question_id": "code/3#1", "image": "code_reasoning/3.png", "category": "code_reasoning", "answer": "No"},
        {"question_id": "code/4#0", "image": "code_reasoning/4.png", "category": "code_reasoning", "answer": "Yes"},
        {"question_id": "code/4#1", "image": "code_reasoning/4.png", "category": "code_reasoning", "answer": "No"},
    ]
    p = preds(
        ("existence/1.png#0", "Yes"), ("existence/1.png#1", "No"),  # image 1: both right
        ("existence/2.png#0", "yes"), ("existence/2.png#1", "Yes"),  # image 2: one right
        ("code/3#0", "Not sure"), ("code/3#1", "The answer is no"),  # "no" (wrong), "other" (wrong)
        ("code/4#0", "yes, it is"), ("code/4#1", "no"),  # both right
    )
    # existence: acc 3/4, acc+ 1/2 -> 75 + 50 = 125. code_reasoning: acc 2/4, acc+ 1/2 -> 50 + 50 = 100.
    out = score("mme", p, gt)
    assert out["subtasks"] == pytest.approx({"existence": 125.0, "code_reasoning": 100.0})
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(100.0)
    assert len(out["missing_subtasks"]) == 12 and "existence" not in out["missing_subtasks"]
    assert primary_metric("mme", out) == pytest.approx(125.0)


def test_mme_rejects_odd_images_and_unknown_subtasks():
    row = {"image": "count/1.png", "category": "count", "answer": "Yes"}
    with pytest.raises(EvalDataError, match=r"'count/1.png': 1 questions"):
        score("mme", preds((1, "yes")), [{"question_id": 1, **row}])
    with pytest.raises(EvalDataError, match=r"unknown MME subtask 'Count'"):
        score("mme", preds((1, "yes")), [{"question_id": 1, **row, "category": "Count"}])


def test_mme_answer_space_is_yes_no_in_any_case():
    """MME's answer files say Yes / No; calculation.py lower-cases both sides, so "yes" ground truth is the
    same answer, while anything else is a broken file."""
    gt = [{"question_id": 1, "image": "count/1.png", "category": "count", "answer": "Yes"},
          {"question_id": 2, "image": "count/1.png", "category": "count", "answer": "no"}]
    assert score("mme", preds((1, "YES"), (2, "No.")), gt)["subtasks"] == {"count": 200.0}
    with pytest.raises(EvalDataError, match=r"question_id 2: MME answer 'Maybe'; expected Yes or No"):
        score("mme", preds((1, "yes"), (2, "no")), [gt[0], {**gt[1], "answer": "Maybe"}])


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("B", "B"),
        ("C. Paris", "C"),
        ("The answer is B.", "B"),
        ("The answer is B", None),  # the pattern wants one more character after the letter
        ("The answer is A. No wait, the answer is B.", "A"),  # "the" lower-case: one match only
        ("The answer is A. The answer is B.", None),  # two matches: unparseable
        ("b", None),
        ("Paris", None),
    ],
)
def test_scienceqa_parse(text, parsed):
    assert scienceqa_parse(text) == parsed


def test_scienceqa():
    gt = [
        {"question_id": "1", "answer": "A", "num_choices": 2, "has_image": True},
        {"question_id": "2", "answer": "B", "num_choices": 3, "has_image": True},
        {"question_id": "3", "answer": "C", "num_choices": 3, "has_image": False},
        {"question_id": "4", "answer": "B", "num_choices": 2, "has_image": True},
        {"question_id": "5", "answer": "A", "num_choices": 2, "has_image": False},
        {"question_id": "6", "answer": "B", "num_choices": 4, "has_image": False},
    ]
    p = preds(
        ("1", "A"),  # right
        ("2", "The answer is B."),  # right
        ("3", "C. Paris"),  # right
        ("4", "The answer is B"),  # unparseable: wrong
        ("5", "E"),  # beyond 2 choices: wrong
        ("6", "The answer is A. No wait, the answer is B."),  # parsed A: wrong
    )
    # accuracy 3/6; image questions 1, 2, 4 -> 2/3.
    out = score("scienceqa", p, gt)
    assert out == pytest.approx({"accuracy": 50.0, "img_accuracy": 200 / 3})
    assert primary_metric("scienceqa", out) == pytest.approx(200 / 3)
    text_only = score("scienceqa", preds(("3", "C")), [gt[2]])
    assert text_only == {"accuracy": 100.0, "img_accuracy": None}
    with pytest.raises(EvalDataError, match=r"question_id '1'.*'C' not in \('A', 'B'\)"):
        score("scienceqa", preds(("1", "C")), [{**gt[0], "answer": "C"}])


@pytest.mark.parametrize("num_choices", [2, 3, 4, 5])
def test_scienceqa_answer_space_follows_num_choices(num_choices):
    """ScienceQA questions have 2 to 5 choices: the last valid letter scores right, in every answer form
    LLaVA's parser accepts; the first letter past the choices is wrong even when the model writes it."""
    last, beyond = "ABCDE"[num_choices - 1], "ABCDEF"[num_choices]
    gt = [{"question_id": str(i), "answer": last, "num_choices": num_choices, "has_image": True} for i in range(4)]
    p = preds(("0", last), ("1", f"{last}. the last one"), ("2", f"The answer is {last}."), ("3", beyond))
    assert score("scienceqa", p, gt) == pytest.approx({"accuracy": 75.0, "img_accuracy": 75.0})


def test_scienceqa_five_choices_answered_e():
    """The real ScienceQA-IMG test split has 5-choice questions whose answer is E (problems.json answer 4)."""
    gt = [{"question_id": "7", "answer": "E", "num_choices": 5, "has_image": True},
          {"question_id": "8", "answer": "D", "num_choices": 4, "has_image": True}]
    assert score("scienceqa", preds(("7", "E"), ("8", "E")), gt) == pytest.approx(
        {"accuracy": 50.0, "img_accuracy": 50.0})  # E right on the 5-choice question, beyond D on the other


def test_scienceqa_ground_truth_outside_the_answer_space():
    # A ground truth saying E on a 4-choice question is a broken file: refused, with what would fix it.
    with pytest.raises(EvalDataError, match=r"question_id '8': answer 'E' not in \('A', 'B', 'C', 'D'\).*"
                                            r"dpn eval convert --benchmark scienceqa"):
        score("scienceqa", preds(("8", "E")), [{"question_id": "8", "answer": "E", "num_choices": 4, "has_image": True}])
    for bad in (1, 6):
        with pytest.raises(EvalDataError, match=rf"num_choices {bad} not in 2..5"):
            score("scienceqa", preds(("8", "A")), [{"question_id": "8", "answer": "A", "num_choices": bad,
                                                    "has_image": False}])


@pytest.mark.parametrize(
    ("text", "options", "parsed"),
    [
        ("A", {"A": "cat", "B": "dog"}, "A"),
        ("(B)", {"A": "cat", "B": "dog"}, "B"),
        ("The answer is D", {"A": "w", "B": "x", "C": "y", "D": "z"}, "D"),
        # A bare "A" in an answer of more than 3 words may be the article: letters give up, and no
        # option text occurs -> unparseable.
        ("A is the answer", {"A": "red", "B": "blue"}, None),
        ("A.", {"A": "red", "B": "blue"}, "A"),
        ("It is a cat", {"A": "bird", "B": "cat", "C": "dog"}, "B"),  # option text
        ("cat or dog", {"A": "cat", "B": "dog"}, None),  # two option texts: ambiguous
        ("I think so", {"A": "no", "B": "yes"}, None),
    ],
)
def test_mmbench_parse(text, options, parsed):
    assert mmbench_parse(text, options) == parsed


def test_mmbench_circular_needs_every_rotation_right():
    gt = [
        {"question_id": 0, "answer": "A", "options": {"A": "cat", "B": "dog", "C": "bird"}},
        {"question_id": 1_000_000, "answer": "C", "options": {"A": "dog", "B": "bird", "C": "cat"}},
        {"question_id": 2_000_000, "answer": "B", "options": {"A": "bird", "B": "cat", "C": "dog"}},
        {"question_id": 1, "answer": "B", "options": {"A": "yes", "B": "no"}},
        {"question_id": 1_000_001, "answer": "A", "options": {"A": "no", "B": "yes"}},
        {"question_id": 2, "answer": "D", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}},
        {"question_id": 3, "answer": "A", "options": {"A": "red", "B": "blue"}},
    ]
    p = preds(
        (0, "A"), (1_000_000, "C"), (2_000_000, "The answer is a cat"),  # all right (last by text)
        (1, "B"), (1_000_001, "I think so"),  # original right, rotation unparseable
        (2, "The answer is D"),  # right, no rotations
        (3, "A is the answer"),  # unparseable
    )
    # circular: q0 hit, q1 miss, q2 hit, q3 miss -> 2/4. single (originals): q0, q1, q2 right -> 3/4.
    out = score("mmbench", p, gt)
    assert out == pytest.approx({"circular_accuracy": 50.0, "single_accuracy": 75.0})
    assert primary_metric("mmbench", out) == pytest.approx(50.0)


def test_mmbench_answer_space_is_the_options():
    """Options are whatever letter columns a row has: D is right on a 4-option question and E on a
    5-option one; E on a 4-option question is wrong (opencompass parses it, then it matches nothing)."""
    four = {"A": "w", "B": "x", "C": "y", "D": "z"}
    gt = [{"question_id": 0, "answer": "D", "options": four},
          {"question_id": 1, "answer": "E", "options": {**four, "E": "v"}},
          {"question_id": 2, "answer": "A", "options": four},
          {"question_id": 3, "answer": "F", "options": {**four, "E": "v", "F": "u"}}]
    out = score("mmbench", preds((0, "D"), (1, "E"), (2, "E"), (3, "F.")), gt)
    assert out == pytest.approx({"circular_accuracy": 75.0, "single_accuracy": 75.0})
    with pytest.raises(EvalDataError, match=r"question_id 0: answer 'E' is not one of its options \['A', 'B', 'C', 'D'\]"):
        score("mmbench", preds((0, "E")), [{"question_id": 0, "answer": "E", "options": four}])


def test_mmbench_rejects_orphans_and_string_ids():
    options = {"A": "x", "B": "y"}
    with pytest.raises(EvalDataError, match=r"without their original question.*5"):
        score("mmbench", preds((1_000_005, "A")), [{"question_id": 1_000_005, "answer": "A", "options": options}])
    with pytest.raises(EvalDataError, match=r"MMBench question_id '5'"):
        score("mmbench", preds(("5", "A")), [{"question_id": "5", "answer": "A", "options": options}])


def test_seed_exact_match_per_type():
    gt = [
        {"question_id": 1, "answer": "A", "question_type_id": 1},
        {"question_id": 2, "answer": "B", "question_type_id": 1},
        {"question_id": 3, "answer": "C", "question_type_id": 2},
        {"question_id": 4, "answer": "D", "question_type_id": 10},
    ]
    # "B." and " D" are not exact matches: 2 / 4 right; type 1: 1/2, type 2: 1/1, type 10: 0/1.
    out = score("seed", preds((1, "A"), (2, "B."), (3, "C"), (4, " D")), gt)
    assert out["accuracy"] == pytest.approx(50.0)
    assert out["per_type"] == pytest.approx({"1": 50.0, "2": 100.0, "10": 0.0})
    assert list(out["per_type"]) == ["1", "2", "10"]  # numeric order, string keys
    assert "per_category" not in out and "per_data_type" not in out


def test_seed_answer_space_and_breakdowns():
    """SEED-Bench answers are A-D; a prediction "E" is just wrong, a ground truth "E" is refused. With the
    type names and data types SEED-Bench.json carries, the per-name and image / video accuracies follow."""
    gt = [
        {"question_id": 101669, "answer": "D", "question_type_id": 5, "category": "Instances Counting",
         "data_type": "image"},
        {"question_id": 101670, "answer": "A", "question_type_id": 1, "category": "Scene Understanding",
         "data_type": "image"},
        {"question_id": "v1738", "answer": "B", "question_type_id": 10, "category": "Action Recognition",
         "data_type": "video"},
    ]
    out = score("seed", preds((101669, "D"), (101670, "E"), ("v1738", "B")), gt)
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["per_category"] == pytest.approx(
        {"Action Recognition": 100.0, "Instances Counting": 100.0, "Scene Understanding": 0.0})
    assert out["per_data_type"] == pytest.approx({"image": 50.0, "video": 100.0})
    with pytest.raises(EvalDataError, match=r"question_id 1: SEED answer 'E'; expected one of \('A', 'B', 'C', 'D'\)"):
        score("seed", preds((1, "E")), [{"question_id": 1, "answer": "E", "question_type_id": 1}])
    # A breakdown field on some records but not others is a broken file, not a silently smaller breakdown.
    untyped = {k: v for k, v in gt[2].items() if k != "data_type"}
    with pytest.raises(EvalDataError, match=r"question_id 'v1738' has no 'data_type'"):
        score("seed", preds((101669, "D"), ("v1738", "B")), [gt[0], untyped])


def test_vizwiz_unanswerable_and_answer_types():
    """VizWiz's answer space includes "unanswerable" (annotators write it, LLaVA-1.5's prompt asks for
    "Unanswerable"): the EvalAI processor lower-cases the prediction, so it matches."""
    gt = [
        {"question_id": 0, "answers": ["unanswerable"] * 10, "answer_type": "unanswerable", "answerable": 0},
        {"question_id": 1, "answers": ["unanswerable"] * 7 + ["cat"] * 3, "answer_type": "unanswerable",
         "answerable": 0},
        {"question_id": 2, "answers": ["yes"] * 10, "answer_type": "yes/no", "answerable": 1},
        {"question_id": 3, "answers": ["2"] * 10, "answer_type": "number", "answerable": 1},
    ]
    # q0 1.0; q1 "cat" matches 3 annotators: min(1, 3/3) for the 7 leave-outs of an "unanswerable" and
    # min(1, 2/3) for the 3 of a "cat" -> (7 + 2) / 10 = 0.9; q2 1.0; q3 "Two." -> "2": 1.0.
    out = score("vizwiz", preds((0, "Unanswerable"), (1, "Cat"), (2, "Yes"), (3, "Two.")), gt)
    assert out["accuracy"] == pytest.approx(97.5)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 100.0, "unanswerable": 95.0})
    assert list(out["per_answer_type"]) == ["yes/no", "number", "unanswerable"]  # the server's order
    plain = score("vizwiz", preds((0, "unanswerable")), [{"question_id": 0, "answers": ["unanswerable"] * 10}])
    assert plain == {"accuracy": 100.0}
    with pytest.raises(EvalDataError, match=r"question_id 0: VizWiz answer_type 'colour'"):
        score("vizwiz", preds((0, "red")), [{"question_id": 0, "answers": ["red"] * 10, "answer_type": "colour"}])


def test_synthetic_per_difficulty_and_category():
    gt = [
        {"question_id": "s1", "answer": "2", "difficulty": "easy", "category": "count"},
        {"question_id": "s2", "answer": "red circle", "difficulty": "hard", "category": "color"},
        {"question_id": "s3", "answer": "yes", "difficulty": "hard", "category": "existence"},
        {"question_id": "s4", "answer": "blue", "difficulty": "hard", "category": "color"},
    ]
    # "Two." -> "2" right; "The red circle" -> "red circle" right; "Yes, there is" -> "yes there is"
    # wrong; "green" wrong. Overall 2/4; easy 1/1, hard 1/3; color 1/2, count 1/1, existence 0/1.
    p = preds(("s1", "Two."), ("s2", "The red circle"), ("s3", "Yes, there is"), ("s4", "green"))
    out = score("synthetic", p, gt)
    assert set(out) == {"accuracy", "per_difficulty", "per_category", "per_category_difficulty"}
    assert out["accuracy"] == pytest.approx(50.0)
    assert out["per_difficulty"] == pytest.approx({"easy": 100.0, "hard": 100 / 3})
    assert out["per_category"] == pytest.approx({"color": 50.0, "count": 100.0, "existence": 0.0})
    assert out["per_category_difficulty"] == pytest.approx(
        {"color/hard": 50.0, "count/easy": 100.0, "existence/hard": 0.0})


# ------------------------------------------------------------------------------------------------
# Joining and reading: never a silent partial score
# ------------------------------------------------------------------------------------------------

GQA_GT = [{"question_id": 1, "answer": "yes"}, {"question_id": "2", "answer": "no"}]


def test_ids_keep_their_type():
    # 1 (int) and "2" (str) are matched as they are ...
    assert score("gqa", preds((1, "yes"), ("2", "no")), GQA_GT) == {"accuracy": 100.0}
    # ... and "1" is not 1: the error names both spellings.
    with pytest.raises(EvalDataError, match=r"ground truth 1 \(int\) vs prediction '1' \(str\)"):
        score("gqa", preds(("1", "yes"), ("2", "no")), GQA_GT)


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (preds((1, "yes")), r"no prediction for ground-truth question_id '2'"),
        (preds((1, "yes"), (1, "no"), ("2", "no")), r"duplicate prediction for question_id 1"),
        (preds((1, "yes"), ("2", "no"), (3, "x")), r"predictions without ground truth: question_id 3"),
        (preds((True, "yes")), r"question_id True is a bool"),
        (preds((1.0, "yes")), r"question_id 1.0 is a float"),
        ([{"question_id": 1, "text": None}], r"question_id 1 has no string 'text'"),
        ([{"text": "yes"}], r"prediction record 1 has no 'question_id'"),
    ],
)
def test_join_errors(predictions, message):
    with pytest.raises(EvalDataError, match=message):
        score("gqa", predictions, GQA_GT)


def test_extra_predictions_can_be_allowed_and_other_errors():
    p = preds((1, "yes"), ("2", "yes"), (3, "x"))
    # Only the ground truth is scored: 1 right, "2" wrong.
    assert score("gqa", p, GQA_GT, allow_extra_predictions=True) == {"accuracy": 50.0}
    with pytest.raises(EvalDataError, match=r"duplicate ground-truth question_id 1"):
        score("gqa", preds((1, "yes")), [GQA_GT[0], GQA_GT[0]])
    with pytest.raises(EvalDataError, match=r"empty"):
        score("gqa", [], [])
    with pytest.raises(EvalDataError, match=r"unknown benchmark 'vqa'; valid: vqav2, gqa"):
        score("vqa", p, GQA_GT)
    with pytest.raises(EvalDataError, match=r"question_id 1 has no 'answer'"):
        score("gqa", preds((1, "yes")), [{"question_id": 1}])


def test_load_jsonl_names_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": "1", "text": "b"}\n')
    assert load_jsonl(good) == [{"question_id": 1, "text": "a"}, {"question_id": "1", "text": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 2, "text": \n')
    with pytest.raises(EvalDataError, match=rf"{bad}:3: malformed JSON"):
        load_jsonl(bad)
    bad.write_text('{"question_id": 1}\n[1, 2]\n')
    with pytest.raises(EvalDataError, match=rf"{bad}:2: expected a JSON object, got list"):
        load_jsonl(bad)


def test_registry_covers_the_suite():
    assert set(SCORERS) == {"vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmbench", "seed", "vizwiz",
                            "synthetic"}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_score_end_to_end(tmp_path):
    p = _write_jsonl(tmp_path / "pred.jsonl", [
        {"question_id": 1, "prompt": "q", "text": "Two", "answer_id": "x", "model_id": "m", "metadata": {}},
        {"question_id": 2, "prompt": "q", "text": "the cat.", "answer_id": "y", "model_id": "m", "metadata": {}},
    ])
    g = _write_jsonl(tmp_path / "gt.jsonl", [
        {"question_id": 1, "answers": ["2"] * 10},
        {"question_id": 2, "answers": ["cat"] * 2 + ["dog"] * 8},
    ])
    # (1.0 + 0.6) / 2 = 0.8
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "eval", "score", "--benchmark", "vqav2",
         "--predictions", str(p), "--ground-truth", str(g)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == pytest.approx({"accuracy": 80.0})
    assert score_files("vqav2", p, g) == pytest.approx({"accuracy": 80.0})


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from jobs.cli import main

    g = _write_jsonl(tmp_path / "gt.jsonl", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}])
    p = tmp_path / "pred.jsonl"
    p.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "no"\n')
    argv = ["eval", "score", "--benchmark", "gqa", "--predictions", str(p), "--ground-truth", str(g)]
    assert main(argv) == 2
    assert f"{p}:2: malformed JSON" in capsys.readouterr().err

    _write_jsonl(p, [{"question_id": 1, "text": "yes"}])
    assert main(argv) == 2
    assert "no prediction for ground-truth question_id 2" in capsys.readouterr().err

    assert main(["eval", "score", "--benchmark", "nope", "--predictions", str(p), "--ground-truth", str(g)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err

    assert main(["eval", "score", "--benchmark", "gqa", "--predictions", str(tmp_path / "missing.jsonl"),
                 "--ground-truth", str(g)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

    _write_jsonl(p, [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "yes"}])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"accuracy": 50.0}


def test_cli_score_pope_prints_the_overall(tmp_path, capsys):
    from jobs.cli import main

    g = _write_jsonl(tmp_path / "gt.jsonl", [
        {"question_id": 1, "answer": "yes", "category": "adversarial"},
        {"question_id": 10000001, "answer": "no", "category": "random"},
        {"question_id": 20000001, "answer": "yes", "category": "popular"},
    ])
    p = _write_jsonl(tmp_path / "pred.jsonl", [
        {"question_id": 1, "text": "Yes"}, {"question_id": 10000001, "text": "Yes"},
        {"question_id": 20000001, "text": "Yes"},
    ])
    assert main(["eval", "score", "--benchmark", "pope", "--predictions", str(p), "--ground-truth", str(g)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(printed) == ["adversarial", "popular", "random", "overall"]
    # adversarial and popular: one TP each (all 100, yes ratio 100); random: one FP (all 0, yes ratio 100).
    assert printed["overall"] == pytest.approx(
        {"accuracy": 200 / 3, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3, "yes_ratio": 100.0})
