"""Official-equivalent scoring of the LLaVA-1.5 evaluation suite (plus the project's synthetic benchmark).

`score(benchmark, predictions, ground_truth)` joins LLaVA answer records (`question_id`, `text`) to one
ground-truth record per question and returns the benchmark's metrics. Every rule below is a
reimplementation of the script behind LLaVA-1.5's published numbers (LLaVA's eval scripts and the
official tools they call); where this module deliberately differs, the docstring says so.

| benchmark | ground truth fields | metrics | rule |
| --- | --- | --- | --- |
| vqav2 | answers (annotator strings, 10) | accuracy | EvalAI processor on the prediction (LLaVA's submission step), then official VQA accuracy |
| vizwiz | answers (annotator strings, 10; "unanswerable" is one), optional answer_type, answerable | accuracy, per_answer_type (with answer_type) | EvalAI processor, then official VizWiz accuracy (raw annotator answers) |
| textvqa | answers (exactly 10) | accuracy | m4c TextVQA evaluator (EvalAI processing on both sides) |
| gqa | answer (testdev-balanced) | accuracy | `text.rstrip('.').lower() == answer` (convert_gqa_for_eval + GQA eval.py) |
| pope | answer (yes/no), category (adversarial / popular / random) | per category: accuracy, precision, recall, f1, yes_ratio; overall: their mean over the categories | LLaVA eval_pope.py parsing |
| mme | image, category (subtask), answer (Yes/No) | perception, cognition, subtasks, missing_subtasks | MME calculation.py |
| scienceqa | answer (letter A-E), num_choices (2-5), has_image | accuracy, img_accuracy | LLaVA eval_science_qa.py parsing |
| mmbench | answer (letter), options {letter: text} (A-D in dev_20230712; the format allows E) | circular_accuracy, single_accuracy | opencompass eval_mmbench.py matching, no GPT |
| seed | answer (A-D), question_type_id, optional category (type name), data_type | accuracy, per_type, per_category, per_data_type | exact match (convert_seed_for_submission.py) |
| synthetic | answer, difficulty, category | accuracy, per_difficulty, per_category, per_category_difficulty | exact match after `evalai_normalize` |

Answer spaces, as the official files have them (`dpn eval convert` writes these fields from them): ScienceQA
questions have 2 to 5 choices (problems.json `choices`, `answer` an index into them), so the answer is one of
the first num_choices letters of A-E; SEED-Bench-1 answers are A-D; MMBench's options are the TSV's letter
columns up to the first empty cell; POPE labels are "yes"/"no"; MME answers "Yes"/"No"; VizWiz annotators
answer "unanswerable" where the question cannot be answered. A ground-truth answer outside its space is an
error (it means a broken or mis-built ground-truth file); a *prediction* outside it is simply wrong.

All accuracies and ratios are percentages in [0, 100], unrounded (the official tools print 2 decimals);
MME reports scores (a subtask scores 100 * (acc + acc+), at most 200).

Joining: `question_id` must be a JSON integer or string and is matched *with its type*: `1` and `"1"`
are different questions. (LLaVA's files mix the two: GQA ids are strings, most others ints, and
LLaVA's SEED script casts SEED-Bench.json's string ids to int to find its answers.)
Casting here could silently pair the wrong records, so a type mismatch is an error that says so.
Every ground-truth id needs exactly one prediction; duplicates, missing ids, predictions without
ground truth (unless `allow_extra_predictions`), malformed records and unknown benchmark names raise
`EvalDataError` naming the file/line, id or name. There is no partial score.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

from dpn.eval.vqa_normalize import evalai_normalize, textvqa_accuracy, vizwiz_accuracy, vqa_accuracy


class EvalDataError(ValueError):
    """Invalid evaluation input (question, prediction or ground-truth data, benchmark name); the message
    names the file and line, the question id or the name."""


QuestionId = int | str
Pair = tuple[Mapping[str, Any], str]  # (ground-truth record, predicted text)


# ----------------------------------------------------------------------------------------------
# Reading and joining
# ----------------------------------------------------------------------------------------------


def load_jsonl(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects. Blank lines are skipped; anything else that is not a JSON
    object raises `EvalDataError("<path>:<line>: ...")`. A missing file raises `FileNotFoundError`."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _question_id(record: Mapping[str, Any], what: str, position: int) -> QuestionId:
    if "question_id" not in record:
        raise EvalDataError(f"{what} record {position} has no 'question_id'")
    qid = record["question_id"]
    # bool is an int subclass and floats lose integers above 2**53: neither is a usable id.
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise EvalDataError(
            f"{what} record {position}: question_id {qid!r} is a {type(qid).__name__}; "
            "expected a JSON integer or string"
        )
    return qid


def _key(qid: QuestionId) -> tuple[type, QuestionId]:
    # Keyed by (type, value) so that 1 and "1" can never meet.
    return (type(qid), qid)


def _other_type(qid: QuestionId) -> QuestionId | None:
    if isinstance(qid, int):
        return str(qid)
    if re.fullmatch(r"-?\d+", qid):
        return int(qid)
    return None


def _show(ids: Sequence[QuestionId], limit: int = 5) -> str:
    shown = ", ".join(repr(q) for q in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def join_predictions(
    predictions: Iterable[Mapping[str, Any]],
    ground_truth: Iterable[Mapping[str, Any]],
    *,
    allow_extra_predictions: bool = False,
) -> list[Pair]:
    """Pair every ground-truth record with its prediction's `text`, in ground-truth order.

    Raises `EvalDataError` for: a record without a valid `question_id`, a prediction without a string
    `text`, a duplicate id on either side, a ground-truth id without a prediction (with a hint when the
    same id exists with the other JSON type), predictions without ground truth (unless
    `allow_extra_predictions`), and empty ground truth.
    """
    by_key: dict[tuple[type, QuestionId], str] = {}
    for position, record in enumerate(predictions, start=1):
        qid = _question_id(record, "prediction", position)
        if _key(qid) in by_key:
            raise EvalDataError(f"duplicate prediction for question_id {qid!r} (prediction record {position})")
        text = record.get("text")
        if not isinstance(text, str):
            raise EvalDataError(f"prediction for question_id {qid!r} has no string 'text' (got {text!r})")
        by_key[_key(qid)] = text

    pairs: list[Pair] = []
    used: set[tuple[type, QuestionId]] = set()
    missing: list[QuestionId] = []
    type_mismatch: list[tuple[QuestionId, QuestionId]] = []
    for position, record in enumerate(ground_truth, start=1):
        qid = _question_id(record, "ground-truth", position)
        if _key(qid) in used:
            raise EvalDataError(f"duplicate ground-truth question_id {qid!r} (ground-truth record {position})")
        used.add(_key(qid))
        if _key(qid) not in by_key:
            alt = _other_type(qid)
            if alt is not None and _key(alt) in by_key:
                type_mismatch.append((qid, alt))
            missing.append(qid)
            continue
        pairs.append((record, by_key[_key(qid)]))

    if type_mismatch:
        gt_id, pred_id = type_mismatch[0]
        raise EvalDataError(
            f"{len(type_mismatch)} ground-truth question_id(s) match predictions only after a type change, "
            f"e.g. ground truth {gt_id!r} ({type(gt_id).__name__}) vs prediction {pred_id!r} "
            f"({type(pred_id).__name__}); ids are compared with their JSON type: write both files with "
            "the same id type"
        )
    if missing:
        raise EvalDataError(f"no prediction for ground-truth question_id {_show(missing)}")
    extra = [key[1] for key in by_key if key not in used]
    if extra and not allow_extra_predictions:
        raise EvalDataError(
            f"predictions without ground truth: question_id {_show(extra)} "
            "(pass allow_extra_predictions / --allow-extra-predictions to score a subset)"
        )
    if not pairs:
        raise EvalDataError("the ground truth is empty: nothing to score")
    return pairs


def _field(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...], hint: str = "") -> Any:
    qid = record.get("question_id")
    if name not in record:
        raise EvalDataError(f"ground truth for question_id {qid!r} has no '{name}'" + (f" ({hint})" if hint else ""))
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false arrive as bool, an int subclass: only accepted where bool is asked for.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = hint or " or ".join(k.__name__ for k in kinds)
        raise EvalDataError(
            f"ground truth for question_id {qid!r}: '{name}' is {value!r} ({type(value).__name__}); expected {expected}"
        )
    return value


def _percent(numerator: float, denominator: int) -> float:
    return 100.0 * numerator / denominator


# ----------------------------------------------------------------------------------------------
# VQAv2, VizWiz, TextVQA: soft accuracy against 10 annotators
# ----------------------------------------------------------------------------------------------


def _annotator_answers(record: Mapping[str, Any], exactly: int | None) -> list[str]:
    answers = _field(record, "answers", list, "a list of annotator answer strings")
    qid = record.get("question_id")
    if not answers or not all(isinstance(a, str) for a in answers):
        raise EvalDataError(f"ground truth for question_id {qid!r}: 'answers' must be a non-empty list of strings")
    if exactly is not None and len(answers) != exactly:
        raise EvalDataError(
            f"ground truth for question_id {qid!r}: {len(answers)} answers, the evaluator needs exactly {exactly}"
        )
    return answers


def score_vqav2(pairs: Sequence[Pair]) -> dict[str, float]:
    """LLaVA normalises the prediction with the EvalAI processor before submission; the server then
    runs the official VQA accuracy (which re-processes only when annotators disagree)."""
    total = sum(vqa_accuracy(evalai_normalize(text), _annotator_answers(g, None)) for g, text in pairs)
    return {"accuracy": _percent(total, len(pairs))}


VIZWIZ_ANSWER_TYPES = ("other", "yes/no", "number", "unanswerable")


def score_vizwiz(pairs: Sequence[Pair]) -> dict[str, Any]:
    """EvalAI processor (LLaVA's submission step), then the official VizWiz accuracy. "Unanswerable" is an
    answer like any other: annotators who could not answer wrote "unanswerable", and LLaVA-1.5's prompt asks
    for it. With `answer_type` in every record (VizWiz's val.json has it), `per_answer_type` adds the
    breakdown the VizWiz evaluation server reports (other, yes/no, number, unanswerable)."""
    total = 0.0
    by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    # Any record with an answer_type asks for the breakdown: then every record needs one.
    typed = any("answer_type" in g for g, _ in pairs)
    for g, text in pairs:
        accuracy = vizwiz_accuracy(evalai_normalize(text), _annotator_answers(g, None))
        total += accuracy
        if typed:
            answer_type = _field(g, "answer_type", str)
            if answer_type not in VIZWIZ_ANSWER_TYPES:
                raise EvalDataError(
                    f"ground truth for question_id {g['question_id']!r}: VizWiz answer_type {answer_type!r}; "
                    f"expected one of {VIZWIZ_ANSWER_TYPES}"
                )
            by_type[answer_type][0] += accuracy
            by_type[answer_type][1] += 1
    out: dict[str, Any] = {"accuracy": _percent(total, len(pairs))}
    if typed:
        out["per_answer_type"] = {t: _percent(by_type[t][0], by_type[t][1]) for t in VIZWIZ_ANSWER_TYPES if t in by_type}
    return out


def score_textvqa(pairs: Sequence[Pair]) -> dict[str, float]:
    """LLaVA's m4c `TextVQAAccuracyEvaluator`, which asserts exactly 10 answers per question."""
    total = sum(textvqa_accuracy(text, _annotator_answers(g, 10)) for g, text in pairs)
    return {"accuracy": _percent(total, len(pairs))}


# ----------------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------------


def gqa_normalize(text: str) -> str:
    """LLaVA's `convert_gqa_for_eval.py`: trailing periods stripped, lower-cased. GQA's `eval.py` then
    compares with the gold answer by plain string equality."""
    return text.rstrip(".").lower()


def score_gqa(pairs: Sequence[Pair]) -> dict[str, float]:
    correct = sum(gqa_normalize(text) == _field(g, "answer", str) for g, text in pairs)
    return {"accuracy": _percent(correct, len(pairs))}


# ----------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """LLaVA's `eval_pope.py`: keep the text before the first '.', drop commas, split on single spaces;
    "no" if a word is exactly "No", "no" or "not", otherwise "yes" (so "NO" and "Nope" count as yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


POPE_OVERALL = "overall"
_POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(pairs: Sequence[Pair]) -> dict[str, dict[str, float]]:
    """Per category (adversarial / popular / random): accuracy, precision, recall, F1 of the "yes"
    class, and yes_ratio = share of *predicted* yes. `overall`: each of those five averaged over the
    categories present (the unweighted mean of the splits, which is what papers report as POPE's F1 /
    accuracy; not a pooled count). Divergence: where LLaVA's script divides by zero (no predicted or no
    actual "yes"), precision / recall / F1 are 0 here."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
    for g, text in pairs:
        label = _field(g, "answer", str)
        if label not in ("yes", "no"):
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: POPE answer {label!r}; expected 'yes' or 'no'"
            )
        category = _field(g, "category", str)
        if category == POPE_OVERALL:
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: POPE category {category!r} is reserved for "
                "the mean over the splits; expected adversarial, popular or random"
            )
        pred_yes = pope_parse(text) == "yes"
        c = counts[category]
        if label == "yes":
            c["tp" if pred_yes else "fn"] += 1
        else:
            c["fp" if pred_yes else "tn"] += 1
    out: dict[str, dict[str, float]] = {}
    for category in sorted(counts):
        c = counts[category]
        n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[category] = {
            "accuracy": _percent(c["tp"] + c["tn"], n),
            "precision": 100.0 * precision,
            "recall": 100.0 * recall,
            "f1": 100.0 * f1,
            "yes_ratio": _percent(c["tp"] + c["fp"], n),
        }
    out[POPE_OVERALL] = {m: sum(split[m] for split in out.values()) / len(out) for m in _POPE_METRICS}
    return out


# ----------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------

# The official subtask groupings of MME's `calculation.py` (perception max 2000, cognition max 800).
MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)


def mme_parse(text: str) -> str:
    """MME `calculation.py`: lower-case; exactly "yes"/"no", else "yes" or "no" found within the first
    4 characters (yes first), else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Per subtask: acc = share of questions right, acc+ = share of images with *both* questions right,
    score = 100 * (acc + acc+). Perception / cognition are the sums over the subtasks present (None when
    none of a group is present); `missing_subtasks` lists official subtasks absent from the ground truth,
    so a partial total is never mistaken for a full one."""
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    # subtask -> image -> [is_correct, ...]
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for g, text in pairs:
        subtask = _field(g, "category", str)
        if subtask not in known:
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: unknown MME subtask {subtask!r}; "
                f"valid: {', '.join(MME_PERCEPTION + MME_COGNITION)}"
            )
        label = _field(g, "answer", str).lower()
        if label not in ("yes", "no"):
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: MME answer {g['answer']!r}; expected Yes or No"
            )
        image = _field(g, "image", str)
        per_image[subtask][image].append(mme_parse(text) == label)

    subtasks: dict[str, float] = {}
    for subtask, images in per_image.items():
        for image, results in images.items():
            # calculation.py pairs consecutive lines and asserts two questions per image.
            if len(results) != 2:
                raise EvalDataError(
                    f"MME subtask {subtask!r}, image {image!r}: {len(results)} questions; MME has exactly 2 per image"
                )
        n_questions = sum(len(r) for r in images.values())
        acc = sum(sum(r) for r in images.values()) / n_questions
        acc_plus = sum(all(r) for r in images.values()) / len(images)
        subtasks[subtask] = 100.0 * acc + 100.0 * acc_plus

    def total(group: tuple[str, ...]) -> float | None:
        present = [subtasks[s] for s in group if s in subtasks]
        return sum(present) if present else None

    ordered = {s: subtasks[s] for s in MME_PERCEPTION + MME_COGNITION if s in subtasks}
    return {
        "perception": total(MME_PERCEPTION),
        "cognition": total(MME_COGNITION),
        "subtasks": ordered,
        "missing_subtasks": [s for s in MME_PERCEPTION + MME_COGNITION if s not in subtasks],
    }


# ----------------------------------------------------------------------------------------------
# ScienceQA
# ----------------------------------------------------------------------------------------------

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_MIN_CHOICES = 2  # ScienceQA's questions have 2 to 5 choices (problems.json `choices`)
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str) -> str | None:
    """LLaVA's `eval_science_qa.py`: the whole text is a letter A-E; or it starts with "<letter>. ";
    or it contains exactly one "The answer is <X>" followed by any character. None = unparseable."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(pairs: Sequence[Pair]) -> dict[str, float | None]:
    """accuracy over all questions, img_accuracy over those with an image (None when there are none).
    A parsed letter beyond the question's number of choices is wrong, as is an unparseable answer."""
    correct = n_img = correct_img = 0
    for g, text in pairs:
        qid = g["question_id"]
        num_choices = _field(g, "num_choices", int)
        if not SCIENCEQA_MIN_CHOICES <= num_choices <= len(SCIENCEQA_OPTIONS):
            raise EvalDataError(
                f"ground truth for question_id {qid!r}: num_choices {num_choices} not in "
                f"{SCIENCEQA_MIN_CHOICES}..{len(SCIENCEQA_OPTIONS)} (ScienceQA questions have 2 to 5 choices)"
            )
        valid = SCIENCEQA_OPTIONS[:num_choices]
        answer = _field(g, "answer", str)
        if answer not in valid:
            raise EvalDataError(
                f"ground truth for question_id {qid!r}: answer {answer!r} not in {valid}: num_choices must be the "
                "length of the problem's `choices` in problems.json (`dpn eval convert --benchmark scienceqa` "
                "writes it)"
            )
        has_image = _field(g, "has_image", bool)
        parsed = scienceqa_parse(text)
        # The answer is one of the valid letters, so a letter beyond num_choices is wrong here too.
        hit = parsed is not None and parsed == answer
        correct += hit
        if has_image:
            n_img += 1
            correct_img += hit
    return {
        "accuracy": _percent(correct, len(pairs)),
        "img_accuracy": _percent(correct_img, n_img) if n_img else None,
    }


# ----------------------------------------------------------------------------------------------
# MMBench (circular)
# ----------------------------------------------------------------------------------------------

MMBENCH_CIRCULAR_OFFSET = 1_000_000  # rotated copies of question i have TSV index i + k * 1e6


MMBENCH_CANDIDATES = "ABCDE"


def _mmbench_infer_option(answer: str, options: Mapping[str, str] | None = None) -> str | None:
    # opencompass `tools/eval_mmbench.py::can_infer_option` (the evaluator of mmbench_dev_20230712):
    # candidate letters are always A-E, whatever the number of options (a letter beyond the options is then
    # simply wrong). Option letters beyond E (not in MMBench itself; the TSV format allows them) join in.
    choices = MMBENCH_CANDIDATES + "".join(sorted(k for k in (options or {}) if k not in MMBENCH_CANDIDATES))
    if "Failed to obtain answer via API" in answer:
        return None
    tokens = answer.split()

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in tokens for c in choices)

    if count() == 1:
        for c in choices:
            # A bare "A" in a longer answer may be the article: give up on bare letters.
            if "A" in tokens and len(tokens) > 3:
                break
            if c in tokens:
                return c
    for prefix, suffix in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
                           ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        if count(prefix, suffix) == 1:
            for c in choices:
                if prefix + c + suffix in tokens:
                    return c
    return None


def _mmbench_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    # `can_infer_text`: the one option whose text (lower-cased) occurs in the answer (lower-cased).
    answer = answer.lower()
    found = [letter for letter, text in options.items() if text.lower() in answer]
    return found[0] if len(found) == 1 else None


def mmbench_parse(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a prediction names: letter matching first, then option-text matching.
    None when neither is unambiguous (the official tool would then ask GPT; here that is wrong)."""
    return _mmbench_infer_option(text, options) or _mmbench_infer_text(text, options)


def _mmbench_options(g: Mapping[str, Any]) -> dict[str, str]:
    options = _field(g, "options", dict, "{letter: option text}")
    for letter, text in options.items():
        if not (isinstance(letter, str) and re.fullmatch(r"[A-Z]", letter)) or not isinstance(text, str) or not text:
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: option {letter!r}: {text!r}; "
                "expected an upper-case letter mapped to non-empty text"
            )
    return options


def score_mmbench(pairs: Sequence[Pair]) -> dict[str, float]:
    """circular_accuracy: a question (index < 1e6) counts only if it and every rotated copy
    (index % 1e6 == its index) are answered right. single_accuracy: the originals alone."""
    groups: dict[int, list[bool]] = defaultdict(list)
    originals: dict[int, bool] = {}
    for g, text in pairs:
        qid = g["question_id"]
        if not isinstance(qid, int) or qid < 0:
            raise EvalDataError(f"MMBench question_id {qid!r}: expected the TSV's non-negative integer index")
        answer = _field(g, "answer", str)
        options = _mmbench_options(g)
        if answer not in options:
            raise EvalDataError(
                f"ground truth for MMBench question_id {qid!r}: answer {answer!r} is not one of its options "
                f"{sorted(options)}"
            )
        hit = mmbench_parse(text, options) == answer
        groups[qid % MMBENCH_CIRCULAR_OFFSET].append(hit)
        if qid < MMBENCH_CIRCULAR_OFFSET:
            originals[qid] = hit
    orphans = sorted(main for main in groups if main not in originals)
    if orphans:
        raise EvalDataError(
            f"MMBench rotated copies without their original question: index % 1e6 = {_show(orphans)}"
        )
    n = len(originals)
    return {
        "circular_accuracy": _percent(sum(all(groups[i]) for i in originals), n),
        "single_accuracy": _percent(sum(originals.values()), n),
    }


# ----------------------------------------------------------------------------------------------
# SEED-Bench, synthetic
# ----------------------------------------------------------------------------------------------


SEED_OPTIONS = ("A", "B", "C", "D")  # SEED-Bench's choice_a .. choice_d


def score_seed(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Exact string match of the whole prediction with the answer letter (no stripping), overall and per
    question type (`per_type`, keyed by question_type_id). Optional fields, all or nothing: `category` (the
    type's name from SEED-Bench.json's `question_type`) adds `per_category`, `data_type` (image / video)
    adds `per_data_type`, the image and video accuracies LLaVA's script prints."""
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    optional = {"category": defaultdict(lambda: [0, 0]), "data_type": defaultdict(lambda: [0, 0])}
    wanted = [name for name in optional if any(name in g for g, _ in pairs)]
    for g, text in pairs:
        answer = _field(g, "answer", str)
        if answer not in SEED_OPTIONS:
            raise EvalDataError(
                f"ground truth for question_id {g['question_id']!r}: SEED answer {answer!r}; expected one of {SEED_OPTIONS}"
            )
        type_id = _field(g, "question_type_id", (int, str))
        hit = text == answer
        buckets = [per_type[str(type_id)]] + [optional[name][_field(g, name, str)] for name in wanted]
        for bucket in buckets:
            bucket[0] += hit
            bucket[1] += 1
    correct = sum(c for c, _ in per_type.values())
    out: dict[str, Any] = {
        "accuracy": _percent(correct, len(pairs)),
        "per_type": {t: _percent(c, n) for t, (c, n) in sorted(per_type.items(), key=_type_order)},
    }
    for name in wanted:
        out[f"per_{name}"] = {k: _percent(c, n) for k, (c, n) in sorted(optional[name].items())}
    return out


def _type_order(item: tuple[str, Any]) -> tuple[int, int | str]:
    key = item[0]
    return (0, int(key)) if re.fullmatch(r"-?\d+", key) else (1, key)


def score_synthetic(pairs: Sequence[Pair]) -> dict[str, Any]:
    """The project's synthetic benchmark: exact match after `evalai_normalize` on both sides
    ("Two." == "2", "the red one" == "red 1"), overall, by difficulty, by category and by both
    (`per_category_difficulty`, keys "category/difficulty")."""
    by_difficulty: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    # Category x difficulty: whether a skill is learned only where it needs no binding (one object).
    by_cell: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for g, text in pairs:
        hit = evalai_normalize(text) == evalai_normalize(_field(g, "answer", str))
        category, difficulty = _field(g, "category", str), _field(g, "difficulty", str)
        for bucket in (by_difficulty[difficulty], by_category[category], by_cell[f"{category}/{difficulty}"]):
            bucket[0] += hit
            bucket[1] += 1
        correct += hit
    return {
        "accuracy": _percent(correct, len(pairs)),
        "per_difficulty": {k: _percent(c, n) for k, (c, n) in sorted(by_difficulty.items())},
        "per_category": {k: _percent(c, n) for k, (c, n) in sorted(by_category.items())},
        "per_category_difficulty": {k: _percent(c, n) for k, (c, n) in sorted(by_cell.items())},
    }


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

SCORERS: dict[str, Callable[[Sequence[Pair]], dict[str, Any]]] = {
    "vqav2": score_vqav2,
    "gqa": score_gqa,
    "textvqa": score_textvqa,
    "scienceqa": score_scienceqa,
    "pope": score_pope,
    "mme": score_mme,
    "mmbench": score_mmbench,
    "seed": score_seed,
    "vizwiz": score_vizwiz,
    "synthetic": score_synthetic,
}


def _scorer(benchmark: str) -> Callable[[Sequence[Pair]], dict[str, Any]]:
    if benchmark not in SCORERS:
        raise EvalDataError(f"unknown benchmark {benchmark!r}; valid: {', '.join(SCORERS)}")
    return SCORERS[benchmark]


def score(
    benchmark: str,
    predictions: Iterable[Mapping[str, Any]],
    ground_truth: Iterable[Mapping[str, Any]],
    *,
    allow_extra_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of `predictions` (LLaVA answer records: `question_id`, `text`) against `ground_truth`.

    Args:
        benchmark: a key of `SCORERS`.
        predictions: one record per question; other fields (prompt, answer_id, ...) are ignored.
        ground_truth: one record per question, fields as in the module docstring.
        allow_extra_predictions: score only the ground-truth questions when predictions cover more.
    Returns:
        The benchmark's metrics (percentages; MME scores); JSON-serialisable.
    Raises:
        EvalDataError: unknown benchmark, join failure or malformed record (the message names it).
    """
    scorer = _scorer(benchmark)
    return scorer(join_predictions(predictions, ground_truth, allow_extra_predictions=allow_extra_predictions))


def score_files(
    benchmark: str,
    predictions: str | PathLike[str],
    ground_truth: str | PathLike[str],
    *,
    allow_extra_predictions: bool = False,
) -> dict[str, Any]:
    """`score` on two JSON-lines files (errors name the file and line)."""
    _scorer(benchmark)  # fail on the name before reading anything
    return score(
        benchmark,
        load_jsonl(predictions),
        load_jsonl(ground_truth),
        allow_extra_predictions=allow_extra_predictions,
    )


def primary_metric(benchmark: str, metrics: Mapping[str, Any]) -> float | None:
    """The single number LLaVA-1.5's results table reports for a benchmark, from `score`'s output:
    accuracy; ScienceQA: img_accuracy (SQA-IMG); POPE: the overall F1 (averaged over the categories
    present); MME: perception; MMBench: circular_accuracy; SEED: accuracy over every ground-truth question
    (LLaVA's script also prints image and video accuracy: `per_data_type`)."""
    _scorer(benchmark)
    if benchmark == "scienceqa":
        return metrics["img_accuracy"]
    if benchmark == "pope":
        return metrics[POPE_OVERALL]["f1"]
    if benchmark == "mme":
        return metrics["perception"]
    if benchmark == "mmbench":
        return metrics["circular_accuracy"]
    return metrics["accuracy"]
