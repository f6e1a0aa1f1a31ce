"""One converter per benchmark of the LLaVA-1.5 suite: its official annotation files (and LLaVA's question
file, where one fits) -> the scorer's ground truth. The formats, ids and matching rules are described in
`dpn.eval.convert`, which is what callers use."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from os import PathLike
from pathlib import Path
from typing import Any

from dpn.eval.benchmarks import SHORT_ANSWER, VIZWIZ_UNANSWERABLE, MMBenchQuestions
from dpn.eval.scoring import (
    SCIENCEQA_MIN_CHOICES,
    SCIENCEQA_OPTIONS,
    SEED_OPTIONS,
    VIZWIZ_ANSWER_TYPES,
    EvalDataError,
    load_jsonl,
)

MME_ANSWERS = ("Yes", "No")
_MME_SUFFIX = "Please answer yes or no."
TEXTVQA_ANSWERS = 10  # the m4c evaluator (and `score_textvqa`) needs exactly 10 per question

_VQAV2_TEST = (
    "VQAv2 test-dev / test answers are not public: those splits are scored by the EvalAI server (submit "
    "the predictions as LLaVA's convert_vqav2_for_submission.py does). For a local score convert the val "
    "split: --annotations v2_mscoco_val2014_annotations.json --questions v2_OpenEnded_mscoco_val2014_questions.json"
)


@dataclass(kw_only=True, frozen=True)
class Conversion:
    """What `convert` produced."""

    benchmark: str
    ground_truth: list[dict[str, Any]]
    """One scorer record per question (`dpn.eval.scoring`'s schema)."""
    questions: list[dict[str, Any]] | None
    """LLaVA-format question records (question_id, image, text, category) when `questions` was given."""
    duplicates_merged: int
    """Question ids that occurred more than once in the annotations with identical records."""
    unmatched_annotations: int
    """Annotated questions left out because the question file does not ask them (0 without one)."""


class _RepeatedKeys(dict):
    """A JSON object with a repeated key: `pairs` keeps every (key, value) in file order."""

    pairs: list[tuple[str, Any]]


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # json.load would keep the last value silently; the GQA reader needs to see every one.
        obj = _RepeatedKeys(obj)
        obj.pairs = pairs
    return obj


def _load_json(path: str | PathLike[str], expected: str, *, keep_repeats: bool = False) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_object_pairs if keep_repeats else None)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); expected {expected}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_question_id(record: Any, path: str | PathLike[str], where: str) -> int:
    if not isinstance(record, dict):
        raise EvalDataError(f"{path}: {where} is a {type(record).__name__}, expected an object")
    qid = record.get("question_id")
    if not _is_int(qid):
        raise EvalDataError(f"{path}: {where}: question_id {qid!r} is not an integer")
    return qid


def _truth_part(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "question_id"}


def _asked_truth(
    truth: list[dict[str, Any]], asked: list[tuple[str, Any]], annotations: str | PathLike[str], hint: str
) -> list[dict[str, Any]]:
    """The ground truth of exactly the asked questions ([(where, question_id)]), in their order. Ids are matched
    with their JSON type (1 is not "1"); a repeated or unannotated id is an error naming where it is asked."""
    by_id = {(type(r["question_id"]), r["question_id"]): r for r in truth}
    kept, seen = [], set()
    for where, qid in asked:
        key = (type(qid), qid)
        if key in seen:
            raise EvalDataError(f"{where}: question_id {qid!r} occurs twice")
        seen.add(key)
        if key not in by_id:
            raise EvalDataError(f"{where}: question_id {qid!r} has no annotation in {annotations} ({hint})")
        kept.append(by_id[key])
    return kept


def _dedupe(rows: list[tuple[str, dict[str, Any]]], path: str | PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """Drop repeats of a question id whose record is identical; raise on a repeat that differs."""
    first: dict[Any, tuple[str, dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    merged = 0
    for where, record in rows:
        qid = record["question_id"]
        if qid in first:
            where0, record0 = first[qid]
            if record0 != record:
                raise EvalDataError(
                    f"{path}: question_id {qid!r} occurs twice with different ground truth: "
                    f"{_truth_part(record0)} ({where0}) vs {_truth_part(record)} ({where})"
                )
            merged += 1
            continue
        first[qid] = (where, record)
        out.append(record)
    if not out:
        raise EvalDataError(f"{path}: no annotated questions")
    return out, merged


# ----- VQAv2 -------------------------------------------------------------------------------------------
def _vqav2_rows(doc: Any, path: str | PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(doc, dict):
        raise EvalDataError(f"{path}: expected VQAv2's annotation JSON object, got a {type(doc).__name__}")
    if "annotations" not in doc:
        if "questions" in doc:
            subtype = doc.get("data_subtype")
            if isinstance(subtype, str) and subtype.startswith("test"):
                raise EvalDataError(f"{path} is the VQAv2 {subtype} question file, which has no answers. {_VQAV2_TEST}")
            raise EvalDataError(
                f"{path} is a VQAv2 question file (data_subtype {subtype!r}): pass it as --questions and the "
                "matching annotation file (v2_mscoco_<split>_annotations.json) as --annotations"
            )
        raise EvalDataError(f"{path}: no 'annotations' list (keys: {sorted(doc)[:8]}); expected VQAv2's "
                            "v2_mscoco_<split>_annotations.json")
    annotations = doc["annotations"]
    if not isinstance(annotations, list):
        raise EvalDataError(f"{path}: 'annotations' is a {type(annotations).__name__}, expected a list")
    rows = []
    for position, ann in enumerate(annotations, start=1):
        where = f"annotation {position}"
        qid = _int_question_id(ann, path, where)
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers:
            raise EvalDataError(f"{path}: {where} (question_id {qid}): 'answers' {answers!r} is not a non-empty list")
        texts = []
        for a in answers:
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise EvalDataError(
                    f"{path}: {where} (question_id {qid}): answer {a!r} is not an object with a string 'answer'"
                )
            texts.append(a["answer"])
        rows.append((where, {"question_id": qid, "answers": texts}))
    return rows


def _vqav2_questions(path: str | PathLike[str]) -> list[dict[str, Any]]:
    expected = "VQAv2's v2_OpenEnded_mscoco_<split>_questions.json"
    doc = _load_json(path, expected)
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise EvalDataError(f"{path}: no 'questions' list; expected {expected}")
    subtype = doc.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise EvalDataError(f"{path}: data_subtype {subtype!r} is not a split name like 'val2014' (it names the images)")
    out = []
    for position, q in enumerate(doc["questions"], start=1):
        where = f"{path}: question {position}"
        if not isinstance(q, dict):
            raise EvalDataError(f"{where} is a {type(q).__name__}, expected an object")
        qid, image_id, text = q.get("question_id"), q.get("image_id"), q.get("question")
        if not _is_int(qid) or not _is_int(image_id):
            raise EvalDataError(f"{where}: question_id {qid!r} / image_id {image_id!r} are not both integers")
        if not isinstance(text, str) or not text.strip():
            raise EvalDataError(f"{where} (question_id {qid}): question {text!r} is not a non-empty string")
        # LLaVA's VQAv2 question files: COCO image file name, the question, then the short-answer line.
        out.append({
            "question_id": qid,
            "image": f"COCO_{subtype}_{image_id:012d}.jpg",
            "text": f"{text.strip()}\n{SHORT_ANSWER}",
            "category": "default",
        })
    return out


# ----- GQA ---------------------------------------------------------------------------------------------
def _gqa_rows(doc: Any, path: str | PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(doc, dict):
        raise EvalDataError(
            f"{path}: expected GQA's question JSON (an object mapping question id -> question), "
            f"got a {type(doc).__name__}"
        )
    pairs = doc.pairs if isinstance(doc, _RepeatedKeys) else list(doc.items())
    rows = []
    for qid, q in pairs:
        where = f"question {qid!r}"
        if not isinstance(q, dict):
            raise EvalDataError(f"{path}: {where} is a {type(q).__name__}, expected an object with 'answer'")
        if "answer" not in q:
            raise EvalDataError(
                f"{path}: {where} has no 'answer' (GQA's test and challenge questions have none: their answers "
                "are not public); convert testdev_balanced_questions.json, the split LLaVA-1.5 reports"
            )
        if not isinstance(q["answer"], str):
            raise EvalDataError(f"{path}: {where}: answer {q['answer']!r} is not a string")
        # JSON object keys are strings, as are the ids of LLaVA's GQA question file.
        rows.append((where, {"question_id": qid, "answer": q["answer"]}))
    return rows


# ----- TextVQA -----------------------------------------------------------------------------------------
def _textvqa_records(doc: Any, path: str | PathLike[str]) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise EvalDataError(f"{path}: no 'data' list; expected TextVQA's TextVQA_0.5.1_<split>.json")
    return doc["data"]


def _textvqa_rows(doc: Any, path: str | PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for position, rec in enumerate(_textvqa_records(doc, path), start=1):
        where = f"data[{position - 1}]"
        qid = _int_question_id(rec, path, where)
        if "answers" not in rec:
            raise EvalDataError(
                f"{path}: {where} (question_id {qid}) has no 'answers' (the TextVQA test split's answers are "
                "not public); convert TextVQA_0.5.1_val.json, the split LLaVA-1.5 reports"
            )
        answers = rec["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise EvalDataError(f"{path}: {where} (question_id {qid}): answers {answers!r} are not a list of strings")
        if len(answers) != TEXTVQA_ANSWERS:
            raise EvalDataError(
                f"{path}: {where} (question_id {qid}): {len(answers)} answers; the TextVQA evaluator needs "
                f"exactly {TEXTVQA_ANSWERS}"
            )
        rows.append((where, {"question_id": qid, "answers": list(answers)}))
    return rows


def _question_key(image_id: str, question: str) -> tuple[str, str]:
    return (image_id, question.strip().lower())


def _textvqa_questions(path: str | PathLike[str], doc: Any, annotations_path: str | PathLike[str]) -> list[dict]:
    """LLaVA's TextVQA question file re-keyed to TextVQA's question ids (see the module docstring)."""
    pending: dict[tuple[str, str], deque[int]] = defaultdict(deque)
    for position, rec in enumerate(_textvqa_records(doc, annotations_path)):
        image_id, question = rec.get("image_id"), rec.get("question")
        if not isinstance(image_id, str) or not isinstance(question, str):
            raise EvalDataError(
                f"{annotations_path}: data[{position}]: image_id {image_id!r} / question {question!r} are not "
                "both strings (needed to match LLaVA's question file)"
            )
        pending[_question_key(image_id, question)].append(rec["question_id"])
    out = []
    for position, rec in enumerate(load_jsonl(path), start=1):
        where = f"{path}: record {position}"
        llava_id, text = rec.get("question_id"), rec.get("text")
        if _is_int(llava_id):
            raise EvalDataError(
                f"{where}: question_id {llava_id!r} is an integer: the file seems keyed by TextVQA question ids "
                "already (use it as questions.jsonl as it is)"
            )
        if not isinstance(llava_id, str) or not isinstance(text, str):
            raise EvalDataError(
                f"{where}: expected LLaVA's TextVQA record with a string question_id (the image id) and text"
            )
        question = text.split("\n", 1)[0]
        key = _question_key(llava_id, question)
        if key not in pending:
            raise EvalDataError(f"{where}: no annotated question {question!r} on image {llava_id!r} in {annotations_path}")
        if not pending[key]:
            raise EvalDataError(
                f"{where}: question {question!r} on image {llava_id!r} occurs more often than in {annotations_path}"
            )
        queue = pending[key]
        out.append({"question_id": queue.popleft(), **{k: v for k, v in rec.items() if k != "question_id"},
                    "image_id": llava_id})
    return out


# ----- MME ---------------------------------------------------------------------------------------------
def _mme_truth(root: str | PathLike[str]) -> dict[tuple[str, str, str], str]:
    """{(subtask, image stem, question): "Yes"/"No"} from MME's release directory."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a directory; expected MME's MME_Benchmark_release_version/")
    truth: dict[tuple[str, str, str], str] = {}
    for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = subtask_dir / "questions_answers_YN"
        if not qa_dir.is_dir():  # the subtasks without an images/ folder keep their .txt beside the images
            qa_dir = subtask_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1] not in MME_ANSWERS:
                    raise EvalDataError(
                        f"{txt}:{number}: {line!r} is not 'question<TAB>Yes' or 'question<TAB>No'"
                    )
                key = (subtask_dir.name, txt.stem, fields[0])
                if key in truth and truth[key] != fields[1]:
                    raise EvalDataError(f"{txt}:{number}: question {fields[0]!r} answered both Yes and No")
                truth[key] = fields[1]
    if not truth:
        raise EvalDataError(f"{root}: no '<subtask>/[questions_answers_YN/]*.txt' answer files")
    return truth


def _mme_convert(root: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """LLaVA's MME question file re-keyed to one id per question, and its ground truth (module docstring)."""
    if questions is None:
        raise EvalDataError(
            "mme needs the question file (LLaVA's llava_mme.jsonl): its questions share ids per image and "
            "are re-keyed here, the answers matched to them"
        )
    truth = _mme_truth(root)
    seen: dict[str, int] = defaultdict(int)
    used: set[tuple[str, str, str]] = set()
    question_records, ground_truth = [], []
    for position, rec in enumerate(load_jsonl(questions), start=1):
        where = f"{questions}: record {position}"
        llava_id, text = rec.get("question_id"), rec.get("text")
        if not isinstance(llava_id, str) or "/" not in llava_id or not isinstance(text, str):
            raise EvalDataError(
                f"{where}: expected LLaVA's MME record: question_id '<subtask>/<image file>' (got {llava_id!r}) "
                "and a string text"
            )
        if "#" in llava_id:
            raise EvalDataError(f"{where}: question_id {llava_id!r} is converted already (use the file as it is)")
        subtask = llava_id.split("/", 1)[0]  # the subtask folder, as LLaVA's converter reads it
        if rec.get("category", subtask) != subtask:
            raise EvalDataError(f"{where}: category {rec['category']!r} is not the subtask of {llava_id!r}")
        stem = Path(llava_id).stem
        question = text.replace(SHORT_ANSWER, "").strip()
        if _MME_SUFFIX not in question:
            question = f"{question} {_MME_SUFFIX}"
        # LLaVA's converter tries the question with one space before the suffix, then with two.
        two_spaces = question.replace(f" {_MME_SUFFIX}", f"  {_MME_SUFFIX}")
        key = next((k for k in ((subtask, stem, question), (subtask, stem, two_spaces)) if k in truth), None)
        if key is None:
            raise EvalDataError(
                f"{where}: no answer for {question!r} in {root}/{subtask}/[questions_answers_YN/]{stem}.txt"
            )
        if key in used:
            raise EvalDataError(f"{where}: question {question!r} on {llava_id!r} is asked twice")
        used.add(key)
        qid = f"{llava_id}#{seen[llava_id]}"
        seen[llava_id] += 1
        image = rec.get("image", llava_id)
        question_records.append({**rec, "question_id": qid, "image": image})
        ground_truth.append({"question_id": qid, "image": image, "category": subtask, "answer": truth[key]})
    if not question_records:
        raise EvalDataError(f"{questions}: no questions")
    return Conversion(benchmark="mme", ground_truth=ground_truth, questions=question_records, duplicates_merged=0,
                      unmatched_annotations=len(truth) - len(used))


# ----- VizWiz ------------------------------------------------------------------------------------------
_VIZWIZ_TEST = (
    "VizWiz test answers are not public: the test split is scored by the EvalAI server (submit the predictions "
    "as LLaVA's convert_vizwiz_for_submission.py does). For a local score convert the val split: "
    "--annotations val.json"
)


def _vizwiz_convert(annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """VizWiz's `<split>.json` -> a LLaVA-format question file (question_id = position in the file, as in
    LLaVA's llava_test.jsonl) and its ground truth (raw annotator answers, answer_type, answerable)."""
    if questions is not None:
        raise EvalDataError(
            "vizwiz takes no question file: LLaVA's llava_test.jsonl is the test split, whose answers are not "
            "public; the val questions are written from --annotations val.json"
        )
    expected = "VizWiz's <split>.json (a JSON array of {image, question, answers, answer_type, answerable})"
    doc = _load_json(annotations, expected)
    if not isinstance(doc, list):
        raise EvalDataError(f"{annotations}: a JSON {type(doc).__name__}; expected {expected}")
    question_records, truth = [], []
    for position, rec in enumerate(doc):
        where = f"{annotations}: record {position}"
        if not isinstance(rec, dict):
            raise EvalDataError(f"{where} is a {type(rec).__name__}, expected an object")
        image, question = rec.get("image"), rec.get("question")
        if not isinstance(image, str) or not image or not isinstance(question, str):
            raise EvalDataError(f"{where}: image {image!r} / question {question!r} are not both strings")
        if "answers" not in rec:
            raise EvalDataError(f"{where} ({image}) has no 'answers'. {_VIZWIZ_TEST}")
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers:
            raise EvalDataError(f"{where} ({image}): 'answers' {answers!r} is not a non-empty list")
        texts = []
        for a in answers:
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise EvalDataError(f"{where} ({image}): answer {a!r} is not an object with a string 'answer'")
            texts.append(a["answer"])
        answer_type, answerable = rec.get("answer_type"), rec.get("answerable")
        if answer_type not in VIZWIZ_ANSWER_TYPES:
            raise EvalDataError(f"{where} ({image}): answer_type {answer_type!r} is not one of {VIZWIZ_ANSWER_TYPES}")
        if not _is_int(answerable) or answerable not in (0, 1):
            raise EvalDataError(f"{where} ({image}): answerable {answerable!r} is not 0 or 1")
        # LLaVA's VizWiz file: the question as asked (trailing spaces kept), then its two instruction lines.
        question_records.append({
            "question_id": position,
            "image": image,
            "text": f"{question}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}",
            "category": "default",
        })
        truth.append({"question_id": position, "answers": texts, "answer_type": answer_type, "answerable": answerable})
    if not truth:
        raise EvalDataError(f"{annotations}: no questions")
    return Conversion(benchmark="vizwiz", ground_truth=truth, questions=question_records, duplicates_merged=0,
                      unmatched_annotations=0)


# ----- POPE --------------------------------------------------------------------------------------------
# LLaVA's llava_pope_test.jsonl: the three COCO splits in this order, each split's question ids offset so that
# they stay unique (adversarial 1.., random 10000001.., popular 20000001..).
POPE_ID_OFFSETS: dict[str, int] = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
_POPE_FILE = re.compile(r"coco_pope_(.+)\.json")


def _pope_files(annotations: str | PathLike[str]) -> list[tuple[str, Path]]:
    """[(split, file)] in LLaVA's order, from one `coco_pope_<split>.json` or a directory of them."""
    root = Path(annotations)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if _POPE_FILE.fullmatch(p.name))
        if not files:
            raise EvalDataError(
                f"{root}: no coco_pope_<split>.json files (POPE's output/coco/ folder, LLaVA's pope/coco/)"
            )
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"{root}: no such POPE annotation file or directory")
    out = []
    for path in files:
        match = _POPE_FILE.fullmatch(path.name)
        split = match.group(1) if match else None
        if split not in POPE_ID_OFFSETS:
            raise EvalDataError(
                f"{path}: not a COCO POPE split file; expected coco_pope_<split>.json with split one of "
                f"{', '.join(POPE_ID_OFFSETS)}"
            )
        out.append((split, path))
    return sorted(out, key=lambda sp: POPE_ID_OFFSETS[sp[0]])


def _pope_split(split: str, path: Path) -> list[dict[str, Any]]:
    """One split's records, checked: {question_id: 1..9999999, image, text, label: yes/no}, ids unique."""
    records = load_jsonl(path)
    seen: set[int] = set()
    for line, rec in enumerate(records, start=1):
        where = f"{path}: record {line}"
        qid = rec.get("question_id")
        if not _is_int(qid) or not 0 < qid < 10_000_000:
            raise EvalDataError(f"{where}: question_id {qid!r} is not an integer in 1..9999999 (POPE numbers from 1)")
        if qid in seen:
            raise EvalDataError(f"{where}: question_id {qid} occurs twice in the {split} split")
        seen.add(qid)
        for key in ("image", "text"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise EvalDataError(f"{where} (question_id {qid}): {key} {rec.get(key)!r} is not a non-empty string")
        if rec.get("label") not in ("yes", "no"):
            raise EvalDataError(f"{where} (question_id {qid}): label {rec.get('label')!r} is not 'yes' or 'no'")
    if not records:
        raise EvalDataError(f"{path}: no questions")
    return records


def _pope_convert(annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """POPE's coco_pope_<split>.json files -> ground truth (and, without LLaVA's question file, that file)."""
    splits = {split: _pope_split(split, path) for split, path in _pope_files(annotations)}
    total = sum(len(records) for records in splits.values())
    if questions is None:
        question_records, truth = [], []
        for split, records in splits.items():
            for rec in records:
                qid = POPE_ID_OFFSETS[split] + rec["question_id"]
                question_records.append({"question_id": qid, "image": rec["image"],
                                         "text": f"{rec['text']}\n{SHORT_ANSWER}", "category": split})
                truth.append({"question_id": qid, "answer": rec["label"], "category": split})
        return Conversion(benchmark="pope", ground_truth=truth, questions=question_records, duplicates_merged=0,
                          unmatched_annotations=0)

    # LLaVA's eval_pope.py pairs each split's answers with its annotation lines by position: so do we, and
    # check that the image and the question agree, so that a shuffled or foreign file cannot pair wrongly.
    used: dict[str, int] = defaultdict(int)
    seen: set[tuple[type, Any]] = set()
    truth = []
    for position, rec in enumerate(load_jsonl(questions), start=1):
        where = f"{questions}: record {position}"
        qid, split, text = rec.get("question_id"), rec.get("category"), rec.get("text")
        if isinstance(qid, bool) or not isinstance(qid, int | str) or not isinstance(text, str):
            raise EvalDataError(f"{where}: expected LLaVA's POPE record with an int or str question_id and a text")
        if (type(qid), qid) in seen:
            raise EvalDataError(f"{where}: question_id {qid!r} occurs twice")
        seen.add((type(qid), qid))
        if not isinstance(split, str) or split not in splits:
            raise EvalDataError(
                f"{where}: category {split!r} has no annotation file coco_pope_{split}.json in {annotations} "
                f"(annotated: {', '.join(splits)})"
            )
        if used[split] >= len(splits[split]):
            raise EvalDataError(f"{where}: more {split} questions than coco_pope_{split}.json has ({len(splits[split])})")
        ann = splits[split][used[split]]
        used[split] += 1
        asked = text.replace(SHORT_ANSWER, "").strip()
        if rec.get("image") != ann["image"] or asked != ann["text"].strip():
            raise EvalDataError(
                f"{where}: {split} question {used[split]} ({rec.get('image')!r}, {asked!r}) is not question "
                f"{used[split]} of coco_pope_{split}.json ({ann['image']!r}, {ann['text']!r}); LLaVA's "
                "eval_pope.py pairs them by position"
            )
        truth.append({"question_id": qid, "answer": ann["label"], "category": split})
    if not truth:
        raise EvalDataError(f"{questions}: no questions")
    return Conversion(benchmark="pope", ground_truth=truth, questions=None, duplicates_merged=0,
                      unmatched_annotations=total - len(truth))


# ----- SEED-Bench --------------------------------------------------------------------------------------
def seed_question_id(raw: int | str) -> int | str:
    """The question id LLaVA's SEED files use: SEED-Bench.json's string id as an int when it is one
    ("101669" -> 101669, as `convert_seed_for_submission.py` casts it), else unchanged ("v1738")."""
    if isinstance(raw, str) and re.fullmatch(r"-?\d+", raw):
        return int(raw)
    return raw


def _seed_convert(annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """SEED-Bench.json -> ground truth {question_id, answer, question_type_id, category, data_type}; with
    LLaVA's llava-seed-bench.jsonl, exactly its questions, in its order."""
    expected = "SEED-Bench.json ({questions: [...], question_type: {name: id}})"
    doc = _load_json(annotations, expected)
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list) \
            or not isinstance(doc.get("question_type"), dict):
        raise EvalDataError(f"{annotations}: no 'questions' list and 'question_type' object; expected {expected}")
    names: dict[int, str] = {}
    for name, type_id in doc["question_type"].items():
        if not _is_int(type_id):
            raise EvalDataError(f"{annotations}: question_type {name!r}: id {type_id!r} is not an integer")
        names[type_id] = name
    rows = []
    for position, q in enumerate(doc["questions"]):
        where = f"questions[{position}]"
        if not isinstance(q, dict):
            raise EvalDataError(f"{annotations}: {where} is a {type(q).__name__}, expected an object")
        raw = q.get("question_id")
        if isinstance(raw, bool) or not isinstance(raw, int | str) or raw == "":
            raise EvalDataError(f"{annotations}: {where}: question_id {raw!r} is not a string or integer")
        where = f"{where} (question_id {raw!r})"
        answer = q.get("answer")
        if answer not in SEED_OPTIONS:
            raise EvalDataError(f"{annotations}: {where}: answer {answer!r} is not one of {SEED_OPTIONS}")
        choice = q.get(f"choice_{answer.lower()}")
        if not isinstance(choice, str) or not choice:
            raise EvalDataError(f"{annotations}: {where}: the answer {answer} has no choice_{answer.lower()} text")
        type_id, data_type = q.get("question_type_id"), q.get("data_type")
        if not _is_int(type_id) or type_id not in names:
            raise EvalDataError(
                f"{annotations}: {where}: question_type_id {type_id!r} is not one of question_type's ids "
                f"{sorted(names)}"
            )
        if not isinstance(data_type, str) or not data_type:
            raise EvalDataError(f"{annotations}: {where}: data_type {data_type!r} is not a non-empty string")
        rows.append((where, {"question_id": seed_question_id(raw), "answer": answer, "question_type_id": type_id,
                             "category": names[type_id], "data_type": data_type}))
    truth, merged = _dedupe(rows, annotations)
    if questions is None:
        return Conversion(benchmark="seed", ground_truth=truth, questions=None, duplicates_merged=merged,
                          unmatched_annotations=0)
    asked = []
    for position, rec in enumerate(load_jsonl(questions), start=1):
        where = f"{questions}: record {position}"
        qid = rec.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, int | str):
            raise EvalDataError(f"{where}: question_id {qid!r} is not an int or str")
        asked.append((where, qid))
    kept = _asked_truth(truth, asked, annotations,
                        "its string ids are matched as LLaVA casts them: digits as int, others as str")
    if not kept:
        raise EvalDataError(f"{questions}: no questions")
    return Conversion(benchmark="seed", ground_truth=kept, questions=None, duplicates_merged=merged,
                      unmatched_annotations=len(truth) - len(kept))


# ----- ScienceQA ---------------------------------------------------------------------------------------
SCIENCEQA_SPLIT = "test"  # what LLaVA-1.5 reports (pid_splits.json's "test": 4241 problems, 2017 with an image)


def _scienceqa_truth(pid: str, problem: Any, path: str | PathLike[str]) -> dict[str, Any]:
    where = f"{path}: problem {pid!r}"
    if not isinstance(problem, dict):
        raise EvalDataError(f"{where} is a {type(problem).__name__}, expected an object")
    choices, answer, image = problem.get("choices"), problem.get("answer"), problem.get("image")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) \
            or not SCIENCEQA_MIN_CHOICES <= len(choices) <= len(SCIENCEQA_OPTIONS):
        raise EvalDataError(
            f"{where}: choices {choices!r} is not a list of {SCIENCEQA_MIN_CHOICES} to {len(SCIENCEQA_OPTIONS)} strings"
        )
    if not _is_int(answer) or not 0 <= answer < len(choices):
        raise EvalDataError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
    if image is not None and not isinstance(image, str):
        raise EvalDataError(f"{where}: image {image!r} is neither null nor a file name")
    return {"question_id": pid, "answer": SCIENCEQA_OPTIONS[answer], "num_choices": len(choices),
            "has_image": image is not None}


def _scienceqa_ids(
    annotations: str | PathLike[str], questions: str | PathLike[str] | None
) -> list[tuple[str, bool | None, str]]:
    """[(problem id, has_image per the question file or None, where)] in question order."""
    if questions is None:
        splits_path = Path(annotations).with_name("pid_splits.json")
        if not splits_path.is_file():
            raise EvalDataError(
                f"{splits_path} not found: pass LLaVA's llava_test_CQM-A.json as --questions, or keep ScienceQA's "
                "pid_splits.json beside problems.json"
            )
        splits = _load_json(splits_path, "ScienceQA's pid_splits.json ({split: [problem ids]})")
        pids = splits.get(SCIENCEQA_SPLIT) if isinstance(splits, dict) else None
        if not isinstance(pids, list) or not all(isinstance(p, str) for p in pids):
            raise EvalDataError(f"{splits_path}: no {SCIENCEQA_SPLIT!r} list of problem ids")
        return [(pid, None, f"{splits_path}: {SCIENCEQA_SPLIT}[{i}]") for i, pid in enumerate(pids)]
    records = _load_json(questions, "LLaVA's llava_test_CQM-A.json (a JSON array of {id, image?, conversations})")
    if not isinstance(records, list):
        raise EvalDataError(
            f"{questions}: a JSON {type(records).__name__}; expected LLaVA's llava_test_CQM-A.json (a JSON array)"
        )
    out = []
    for position, rec in enumerate(records, start=1):
        where = f"{questions}: record {position}"
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise EvalDataError(f"{where}: expected an object with a string 'id' (the ScienceQA problem id)")
        out.append((rec["id"], rec.get("image") is not None, where))
    return out


def _scienceqa_convert(annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """problems.json + (pid_splits.json's test split | LLaVA's llava_test_CQM-A.json) -> ground truth
    {question_id: problem id, answer: letter, num_choices, has_image}."""
    problems = _load_json(annotations, "ScienceQA's problems.json (problem id -> problem)", keep_repeats=True)
    if not isinstance(problems, dict):
        raise EvalDataError(f"{annotations}: a JSON {type(problems).__name__}; expected ScienceQA's problems.json")
    if isinstance(problems, _RepeatedKeys):
        # json.load would keep the last of a repeated problem silently.
        repeated = next(pid for pid, n in Counter(k for k, _ in problems.pairs).items() if n > 1)
        raise EvalDataError(f"{annotations}: problem id {repeated!r} occurs more than once")
    truth, seen = [], set()
    for pid, has_image, where in _scienceqa_ids(annotations, questions):
        if pid in seen:
            raise EvalDataError(f"{where}: problem {pid!r} occurs twice")
        seen.add(pid)
        if pid not in problems:
            raise EvalDataError(f"{where}: problem {pid!r} is not in {annotations}")
        record = _scienceqa_truth(pid, problems[pid], annotations)
        if has_image is not None and has_image != record["has_image"]:
            raise EvalDataError(
                f"{where}: problem {pid!r} {'has' if has_image else 'has no'} image in the question file but "
                f"{'has' if record['has_image'] else 'has no'} image in {annotations} (files of different releases?)"
            )
        truth.append(record)
    if not truth:
        raise EvalDataError(f"{questions or annotations}: no questions")
    return Conversion(benchmark="scienceqa", ground_truth=truth, questions=None, duplicates_merged=0,
                      unmatched_annotations=len(problems) - len(truth))


# ----- MMBench -----------------------------------------------------------------------------------------
def _mmbench_convert(annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """The MMBench TSV -> ground truth {question_id: index, answer, options} (the TSV is also the question
    file, so `questions` is refused)."""
    if questions is not None:
        raise EvalDataError("mmbench takes no question file: the TSV given as --annotations is the question file")
    rows = [(f"index {r['question_id']}", r) for r in MMBenchQuestions().ground_truth(annotations)]
    truth, merged = _dedupe(rows, annotations)
    return Conversion(benchmark="mmbench", ground_truth=truth, questions=None, duplicates_merged=merged,
                      unmatched_annotations=0)


def _rows_convert(benchmark: str, annotations: str | PathLike[str], questions: str | PathLike[str] | None) -> Conversion:
    """vqav2 / gqa / textvqa: one ground-truth row per annotated question, restricted to (and ordered as)
    the question file's questions when one is given."""
    if benchmark == "gqa" and questions is not None:
        raise EvalDataError(
            "gqa takes no question file: LLaVA's llava_gqa_testdev_balanced.jsonl already uses GQA's question ids"
        )
    doc = _load_json(annotations, f"the official {benchmark} annotation file", keep_repeats=benchmark == "gqa")
    rows = {"vqav2": _vqav2_rows, "gqa": _gqa_rows, "textvqa": _textvqa_rows}[benchmark](doc, annotations)
    truth, merged = _dedupe(rows, annotations)
    if questions is None:
        return Conversion(benchmark=benchmark, ground_truth=truth, questions=None, duplicates_merged=merged,
                          unmatched_annotations=0)

    if benchmark == "vqav2":
        question_records = _vqav2_questions(questions)
    else:
        question_records = _textvqa_questions(questions, doc, annotations)
    asked = [(f"{questions}: question {position}", q["question_id"]) for position, q in enumerate(question_records, 1)]
    kept = _asked_truth(truth, asked, annotations, "are both files of the same split?")
    return Conversion(benchmark=benchmark, ground_truth=kept, questions=question_records, duplicates_merged=merged,
                      unmatched_annotations=len(truth) - len(kept))


# One converter of (annotations, questions) per benchmark of the LLaVA-1.5 suite, in the order of its
# results table.
CONVERTERS: dict[str, Callable[[str | PathLike[str], str | PathLike[str] | None], Conversion]] = {
    "vqav2": partial(_rows_convert, "vqav2"),
    "gqa": partial(_rows_convert, "gqa"),
    "vizwiz": _vizwiz_convert,
    "scienceqa": _scienceqa_convert,
    "textvqa": partial(_rows_convert, "textvqa"),
    "pope": _pope_convert,
    "mme": _mme_convert,
    "mmbench": _mmbench_convert,
    "seed": _seed_convert,
}
