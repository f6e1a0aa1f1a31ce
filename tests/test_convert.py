"""Ground truth from the official VQAv2 / GQA / TextVQA / MME annotation files (dpn/eval/convert.py, `dpn eval
convert`): small hand-made files in the official schemas, converted, then read by the benchmark loader
and scored against answer files whose accuracy is computed by hand; then the other five benchmarks of the
suite (VizWiz, POPE, ScienceQA, MMBench, SEED), converted from their official layouts the same way. Broken
inputs are refused with the file and record named."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from dpn.eval.benchmarks import (
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    answer_record,
    scienceqa_question_text,
    write_answers,
)
from dpn.eval.convert import CONVERTIBLE, convert, convert_files
from dpn.eval.converters import POPE_ID_OFFSETS, seed_question_id
from dpn.eval.scoring import EvalDataError, load_jsonl, score_files
from pipelines.evaluation.benchmarks import load_benchmark


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _answer_and_score(benchmark, data_root, tmp_path, texts):
    """Answer the loaded questions with `texts` (by question id), write LLaVA's answer file, score it."""
    data = load_benchmark(benchmark, data_root)
    answers = tmp_path / f"{benchmark}-answers.jsonl"
    write_answers(answers, [answer_record(it, texts[it.question_id], model_id="m") for it in data.items])
    gt = data_root / data.question_file.parent.name / "ground_truth.jsonl"
    return data, score_files(benchmark, answers, gt)


# ----- VQAv2 -------------------------------------------------------------------------------------------
def _vqa_answers(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def _vqav2_annotations(tmp_path, extra=()):
    annotations = [
        {"question_id": 1001, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": _vqa_answers(*["2"] * 4, *["two"] * 3, *["3"] * 3)},
        {"question_id": 1002, "image_id": 42, "question_type": "is the", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": _vqa_answers(*["yes"] * 2, *["no"] * 8)},
        {"question_id": 1003, "image_id": 7, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": _vqa_answers(*["red"] * 10)},
        *extra,
    ]
    return _json(tmp_path / "v2_mscoco_val2014_annotations.json", {
        "info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations,
    })


def _vqav2_questions(tmp_path, name="v2_OpenEnded_mscoco_val2014_questions.json", subtype="val2014", ids=None):
    questions = [
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 1001},
        {"image_id": 42, "question": "Is the dog asleep?", "question_id": 1002},
        {"image_id": 7, "question": "What color is the bus?", "question_id": 1003},
    ]
    if ids is not None:
        questions = [{**q, "question_id": i} for q, i in zip(questions, ids, strict=True)]
    return _json(tmp_path / name, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                   "license": {}, "data_subtype": subtype, "questions": questions})


def test_vqav2_val_ground_truth_questions_and_score(tmp_path):
    # The same annotation twice (identical) is kept once.
    ann = _vqav2_annotations(tmp_path, extra=[
        {"question_id": 1003, "image_id": 7, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": _vqa_answers(*["red"] * 10)},
    ])
    result = convert("vqav2", ann)
    assert result.ground_truth == [
        {"question_id": 1001, "answers": ["2"] * 4 + ["two"] * 3 + ["3"] * 3},
        {"question_id": 1002, "answers": ["yes"] * 2 + ["no"] * 8},
        {"question_id": 1003, "answers": ["red"] * 10},
    ]
    assert result.duplicates_merged == 1 and result.questions is None

    root = tmp_path / "eval"
    (root / "vqav2" / "images").mkdir(parents=True)  # val2014 images go here (preferred over test2015/)
    summary = convert_files("vqav2", ann, root / "vqav2" / "ground_truth.jsonl", questions=_vqav2_questions(tmp_path))
    assert summary == {
        "benchmark": "vqav2", "ground_truth": str(root / "vqav2" / "ground_truth.jsonl"), "records": 3,
        "questions": str(root / "vqav2" / "questions.jsonl"), "duplicates_merged": 1, "unmatched_annotations": 0,
    }
    # LLaVA's VQAv2 question format: COCO file name, question + the short-answer line.
    assert load_jsonl(root / "vqav2" / "questions.jsonl")[0] == {
        "question_id": 1001, "image": "COCO_val2014_000000000042.jpg",
        "text": f"How many dogs are there?\n{SHORT_ANSWER}", "category": "default",
    }
    # VQA accuracy: "Two." -> "2" matches 7 of 10 (after "two" -> "2") = 1; "Yes" matches 2 of 10:
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "blue" = 0. Mean 1.6 / 3.
    data, metrics = _answer_and_score("vqav2", root, tmp_path, {1001: "Two.", 1002: "Yes", 1003: "blue"})
    assert [it.question_id for it in data.items] == [1001, 1002, 1003]
    assert data.items[0].image == str(root / "vqav2" / "images" / "COCO_val2014_000000000042.jpg")
    assert metrics == {"accuracy": pytest.approx(100 * 1.6 / 3)}


def test_vqav2_bad_inputs_name_the_problem(tmp_path):
    testdev = _vqav2_questions(tmp_path, name="v2_OpenEnded_mscoco_test-dev2015_questions.json",
                               subtype="test-dev2015")
    with pytest.raises(EvalDataError, match=r"test-dev2015 question file, which has no answers.*not public.*EvalAI"):
        convert("vqav2", testdev)
    with pytest.raises(EvalDataError, match=r"is a VQAv2 question file.*pass it as --questions"):
        convert("vqav2", _vqav2_questions(tmp_path))
    bad = {"question_id": 1004, "image_id": 7, "answers": [{"answer_id": 1}]}
    with pytest.raises(EvalDataError, match=r"annotation 4 \(question_id 1004\): answer \{'answer_id': 1\}"):
        convert("vqav2", _vqav2_annotations(tmp_path, extra=[bad]))
    with pytest.raises(EvalDataError, match=r"annotation 4: question_id '1004' is not an integer"):
        convert("vqav2", _vqav2_annotations(tmp_path, extra=[{"question_id": "1004", "answers": _vqa_answers("a")}]))
    clash = {"question_id": 1003, "answers": _vqa_answers(*["blue"] * 10)}
    with pytest.raises(EvalDataError, match=r"question_id 1003 occurs twice with different ground truth.*'red'.*"
                       r"annotation 3.*'blue'.*annotation 4"):
        convert("vqav2", _vqav2_annotations(tmp_path, extra=[clash]))
    with pytest.raises(EvalDataError, match=r"question 3: question_id 9 has no annotation"):
        convert("vqav2", _vqav2_annotations(tmp_path), questions=_vqav2_questions(tmp_path, ids=[1001, 1002, 9]))
    with pytest.raises(EvalDataError, match=r"no 'annotations' list"):
        convert("vqav2", _json(tmp_path / "other.json", {"images": []}))
    (tmp_path / "broken.json").write_text('{"annotations": [')
    with pytest.raises(EvalDataError, match=r"broken.json:1: malformed JSON"):
        convert("vqav2", tmp_path / "broken.json")
    with pytest.raises(EvalDataError, match=r"no ground-truth converter for benchmark 'synthetic'"):
        convert("synthetic", tmp_path / "broken.json")


# ----- GQA ---------------------------------------------------------------------------------------------
def _gqa_question(question, answer, image):
    return {"semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image,
            "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": answer,
            "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"detailed": "x", "semantic": "attr", "structural": "verify"}, "fullAnswer": "."}


GQA = {
    "201307251": _gqa_question("Is it overcast?", "no", "n161313"),
    "2062325": _gqa_question("Is the surfer that looks wet wearing a wetsuit?", "yes", "n179136"),
    "20136592": _gqa_question("What color are the pants?", "black", "n446242"),
}


def test_gqa_ground_truth_and_score(tmp_path):
    root = tmp_path / "eval"
    # LLaVA's question file uses GQA's string ids, in an order of its own.
    _jsonl(root / "gqa" / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": qid, "image": f"{GQA[qid]['imageId']}.jpg", "text": f"{GQA[qid]['question']}\n{SHORT_ANSWER}",
         "category": "default"}
        for qid in ("20136592", "201307251", "2062325")
    ])
    ann = _json(tmp_path / "testdev_balanced_questions.json", GQA)
    summary = convert_files("gqa", ann, root / "gqa" / "ground_truth.jsonl")
    assert summary["records"] == 3 and summary["questions"] is None
    assert load_jsonl(root / "gqa" / "ground_truth.jsonl") == [
        {"question_id": "201307251", "answer": "no"},
        {"question_id": "2062325", "answer": "yes"},
        {"question_id": "20136592", "answer": "black"},
    ]
    # convert_gqa_for_eval: rstrip('.').lower(), then exact match: "No." right, "Yes, it is" wrong, "Black" right.
    _, metrics = _answer_and_score("gqa", root, tmp_path,
                                   {"201307251": "No.", "2062325": "Yes, it is", "20136592": "Black"})
    assert metrics == {"accuracy": pytest.approx(200 / 3)}


def test_gqa_repeated_ids_and_missing_answers(tmp_path):
    # json.load keeps the last of a repeated key; the converter sees both.
    same = tmp_path / "same.json"
    same.write_text('{"1": {"answer": "no"}, "2": {"answer": "cat"}, "1": {"answer": "no"}}')
    result = convert("gqa", same)
    assert result.ground_truth == [{"question_id": "1", "answer": "no"}, {"question_id": "2", "answer": "cat"}]
    assert result.duplicates_merged == 1
    clash = tmp_path / "clash.json"
    clash.write_text('{"1": {"answer": "no"}, "1": {"answer": "yes"}}')
    with pytest.raises(EvalDataError, match=r"question_id '1' occurs twice with different ground truth: "
                       r"\{'answer': 'no'\}.*\{'answer': 'yes'\}"):
        convert("gqa", clash)
    test_split = _json(tmp_path / "test_balanced_questions.json", {"7": {"question": "Is it red?", "imageId": "n1"}})
    with pytest.raises(EvalDataError, match=r"question '7' has no 'answer'.*not public"):
        convert("gqa", test_split)
    with pytest.raises(EvalDataError, match=r"question '7': answer 3 is not a string"):
        convert("gqa", _json(tmp_path / "num.json", {"7": {"answer": 3}}))
    with pytest.raises(EvalDataError, match=r"expected GQA's question JSON.*got a list"):
        convert("gqa", _json(tmp_path / "list.json", [GQA["2062325"]]))
    with pytest.raises(EvalDataError, match=r"gqa takes no question file"):
        convert("gqa", same, questions=same)


# ----- TextVQA -----------------------------------------------------------------------------------------
def _textvqa_record(qid, image_id, question, answers):
    return {"question": question, "image_id": image_id, "image_classes": ["Camera"], "flickr_original_url": "",
            "flickr_300k_url": "", "image_width": 1024, "image_height": 768, "answers": answers,
            "question_tokens": question.split(), "question_id": qid, "set_name": "val"}


def _textvqa_annotations(tmp_path, extra=()):
    data = [
        _textvqa_record(34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 7 + ["nous les"] * 3),
        _textvqa_record(34604, "831bcec304a17054", "what brand liquor is on the right?",
                        ["bowmore"] * 3 + ["bowmore islay"] * 7),
        _textvqa_record(34605, "831bcec304a17054", "how long has the drink on the right been aged?",
                        ["10 years"] * 8 + ["10"] * 2),
        *extra,
    ]
    return _json(tmp_path / "TextVQA_0.5.1_val.json",
                 {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})


def _llava_textvqa(path, rows):
    """LLaVA's llava_textvqa_val_v051_ocr.jsonl: the image id as question_id, shared by an image's questions."""
    return _jsonl(path, [
        {"question_id": image_id, "image": f"{image_id}.jpg",
         "text": f"{question}\nReference OCR token: {ocr}\n{SHORT_ANSWER}", "category": "default"}
        for image_id, question, ocr in rows
    ])


LLAVA_TEXTVQA = [
    ("003a8ae2ef43b901", "What is the brand of this camera?", "DAKOTA, DIGITAL"),
    # The image's two questions in the other order than the annotation file: matched by text, not position.
    ("831bcec304a17054", "How long has the drink on the right been aged?", "MORANGIE, AGED, 10"),
    ("831bcec304a17054", "What brand liquor is on the right?", "MORANGIE, AGED, 10"),
]


def test_textvqa_rekeys_llavas_questions_and_scores(tmp_path):
    ann = _textvqa_annotations(tmp_path)
    assert convert("textvqa", ann).ground_truth == [
        {"question_id": 34602, "answers": ["dakota"] * 7 + ["nous les"] * 3},
        {"question_id": 34604, "answers": ["bowmore"] * 3 + ["bowmore islay"] * 7},
        {"question_id": 34605, "answers": ["10 years"] * 8 + ["10"] * 2},
    ]

    root = tmp_path / "eval"
    llava = _llava_textvqa(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", LLAVA_TEXTVQA)
    summary = convert_files("textvqa", ann, root / "textvqa" / "ground_truth.jsonl", questions=llava)
    assert summary["records"] == 3 and summary["unmatched_annotations"] == 0
    questions = load_jsonl(root / "textvqa" / "questions.jsonl")
    originals = load_jsonl(llava)
    assert [q["question_id"] for q in questions] == [34602, 34605, 34604]
    assert questions[1] == {**originals[1], "question_id": 34605, "image_id": "831bcec304a17054"}
    # Ground truth in question order.
    assert [r["question_id"] for r in load_jsonl(root / "textvqa" / "ground_truth.jsonl")] == [34602, 34605, 34604]

    # m4c accuracy (EvalAI processing both sides): "Dakota" matches 7 -> 1; "10" matches 2 of 10 ->
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "Bowmore." -> "bowmore" matches 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    data, metrics = _answer_and_score("textvqa", root, tmp_path, {34602: "Dakota", 34605: "10", 34604: "Bowmore."})
    assert [it.question_id for it in data.items] == [34602, 34605, 34604]
    assert data.items[1].text == originals[1]["text"]  # the prompt is LLaVA's, unchanged
    assert metrics == {"accuracy": pytest.approx(100 * 2.5 / 3)}


def test_textvqa_subset_and_bad_inputs(tmp_path):
    extra = _textvqa_record(34700, "ffff", "what is this?", ["x"] * 10)
    llava = _llava_textvqa(tmp_path / "llava.jsonl", LLAVA_TEXTVQA)
    result = convert("textvqa", _textvqa_annotations(tmp_path, extra=[extra]), questions=llava)
    # Only the questions the question file asks are kept (and counted out).
    assert [r["question_id"] for r in result.ground_truth] == [34602, 34605, 34604]
    assert result.unmatched_annotations == 1

    ann = _textvqa_annotations(tmp_path)
    unknown = _llava_textvqa(tmp_path / "unknown.jsonl", [*LLAVA_TEXTVQA, ("003a8ae2ef43b901", "Who made it?", "")])
    with pytest.raises(EvalDataError, match=r"unknown.jsonl: record 4: no annotated question 'Who made it\?' on "
                       r"image '003a8ae2ef43b901'"):
        convert("textvqa", ann, questions=unknown)
    twice = _llava_textvqa(tmp_path / "twice.jsonl", [*LLAVA_TEXTVQA, LLAVA_TEXTVQA[0]])
    with pytest.raises(EvalDataError, match=r"twice.jsonl: record 4: question 'What is the brand of this camera\?' "
                       r"on image '003a8ae2ef43b901' occurs more often"):
        convert("textvqa", ann, questions=twice)
    rekeyed = _jsonl(tmp_path / "rekeyed.jsonl", [{"question_id": 34602, "text": "what?"}])
    with pytest.raises(EvalDataError, match=r"question_id 34602 is an integer.*keyed by TextVQA question ids already"):
        convert("textvqa", ann, questions=rekeyed)

    nine = _textvqa_record(34701, "eeee", "what?", ["a"] * 9)
    with pytest.raises(EvalDataError, match=r"data\[3\] \(question_id 34701\): 9 answers.*exactly 10"):
        convert("textvqa", _textvqa_annotations(tmp_path, extra=[nine]))
    test_record = {k: v for k, v in _textvqa_record(34702, "dddd", "what?", []).items() if k != "answers"}
    with pytest.raises(EvalDataError, match=r"data\[3\] \(question_id 34702\) has no 'answers'.*not public"):
        convert("textvqa", _textvqa_annotations(tmp_path, extra=[test_record]))
    clash = _textvqa_record(34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["nikon"] * 10)
    with pytest.raises(EvalDataError, match=r"question_id 34602 occurs twice with different ground truth"):
        convert("textvqa", _textvqa_annotations(tmp_path, extra=[clash]))
    with pytest.raises(EvalDataError, match=r"no 'data' list"):
        convert("textvqa", _json(tmp_path / "v.json", {"annotations": []}))


# ----- MME ---------------------------------------------------------------------------------------------
def _mme_release(root, extra_lines=()):
    """MME_Benchmark_release_version/ in both official layouts: existence/ with images/ and
    questions_answers_YN/, code_reasoning/ with each .txt beside its image (and the two-space variant)."""
    yn = root / "existence" / "questions_answers_YN"
    yn.mkdir(parents=True)
    (root / "existence" / "images").mkdir()
    (yn / "1.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                              "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (yn / "2.txt").write_text("Is there a bus in this image? Please answer yes or no.\tNo\n"
                              "Is there a car in this image? Please answer yes or no.\tYes\n" + "".join(extra_lines))
    flat = root / "code_reasoning"
    flat.mkdir()
    (flat / "0020.txt").write_text("Is a python code shown in the picture?  Please answer yes or no.\tYes\n"
                                   "Is a C++ code shown in the picture?  Please answer yes or no.\tNo\n")
    return root


def _llava_mme(path, rows):
    """LLaVA's llava_mme.jsonl: the image path as question_id, shared by the image's two questions."""
    return _jsonl(path, [{"question_id": image, "image": image, "text": f"{question}\n{SHORT_ANSWER}",
                          "category": image.split("/")[0]} for image, question in rows])


LLAVA_MME = [
    ("existence/1.jpg", "Is there a dog in this image?"),
    ("existence/1.jpg", "Is there a cat in this image?"),
    # The image's questions in the other order than its .txt: matched by text, not position.
    ("existence/2.jpg", "Is there a car in this image?"),
    ("existence/2.jpg", "Is there a bus in this image?"),
    ("code_reasoning/0020.png", "Is a python code shown in the picture?"),
    ("code_reasoning/0020.png", "Is a C++ code shown in the picture?"),
]


def test_mme_rekeys_llavas_questions_and_scores(tmp_path):
    root = tmp_path / "eval"
    release = _mme_release(root / "MME" / "MME_Benchmark_release_version")
    llava = _llava_mme(root / "MME" / "llava_mme.jsonl", LLAVA_MME)
    # LLaVA's file as it is cannot be scored (answers join on question_id): the loader says what to run.
    with pytest.raises(EvalDataError, match=r"3 question_id\(s\) occur more than once.*'existence/1.jpg'.*"
                       r"dpn eval convert --benchmark mme --questions llava_mme.jsonl"):
        load_benchmark("mme", root)
    with pytest.raises(EvalDataError, match=r"occur more than once"):  # also when only a prefix is asked
        load_benchmark("mme", root, limit=1)

    summary = convert_files("mme", release, root / "MME" / "ground_truth.jsonl", questions=llava)
    assert summary["records"] == 6 and summary["unmatched_annotations"] == 0
    ids = ["existence/1.jpg#0", "existence/1.jpg#1", "existence/2.jpg#0", "existence/2.jpg#1",
           "code_reasoning/0020.png#0", "code_reasoning/0020.png#1"]
    questions = load_jsonl(root / "MME" / "questions.jsonl")
    assert [q["question_id"] for q in questions] == ids
    assert questions[2] == {**load_jsonl(llava)[2], "question_id": "existence/2.jpg#0"}
    assert load_jsonl(root / "MME" / "ground_truth.jsonl") == [
        {"question_id": qid, "image": qid.split("#")[0], "category": qid.split("/")[0], "answer": answer}
        for qid, answer in zip(ids, ["Yes", "No", "Yes", "No", "Yes", "No"], strict=True)
    ]

    # existence: 1.jpg both right, 2.jpg one right -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125;
    # code_reasoning: both right -> 100 + 100 = 200 (a cognition subtask).
    texts = dict(zip(ids, ["Yes", "No", "Yes", "Yes", "yes", "No"], strict=True))
    data, metrics = _answer_and_score("mme", root, tmp_path, texts)
    assert [it.question_id for it in data.items] == ids
    assert metrics["subtasks"] == pytest.approx({"existence": 125.0, "code_reasoning": 200.0})
    assert metrics["perception"] == pytest.approx(125.0) and metrics["cognition"] == pytest.approx(200.0)


def test_mme_bad_inputs_name_the_problem(tmp_path):
    release = _mme_release(tmp_path / "release")
    llava = _llava_mme(tmp_path / "llava.jsonl", LLAVA_MME)
    with pytest.raises(EvalDataError, match=r"mme needs the question file"):
        convert("mme", release)
    unknown = _llava_mme(tmp_path / "unknown.jsonl", [*LLAVA_MME, ("existence/1.jpg", "Is there a cow?")])
    with pytest.raises(EvalDataError, match=r"unknown.jsonl: record 7: no answer for 'Is there a cow\? Please answer "
                       r"yes or no.' in .*existence/\[questions_answers_YN/\]1.txt"):
        convert("mme", release, questions=unknown)
    twice = _llava_mme(tmp_path / "twice.jsonl", [*LLAVA_MME, LLAVA_MME[0]])
    with pytest.raises(EvalDataError, match=r"twice.jsonl: record 7: question 'Is there a dog .*' on "
                       r"'existence/1.jpg' is asked twice"):
        convert("mme", release, questions=twice)
    converted = _jsonl(tmp_path / "converted.jsonl", [{"question_id": "existence/1.jpg#0", "text": "q"}])
    with pytest.raises(EvalDataError, match=r"'existence/1.jpg#0' is converted already"):
        convert("mme", release, questions=converted)
    not_llava = _jsonl(tmp_path / "ints.jsonl", [{"question_id": 7, "text": "q"}])
    with pytest.raises(EvalDataError, match=r"record 1: expected LLaVA's MME record.*got 7"):
        convert("mme", release, questions=not_llava)
    wrong_category = _jsonl(tmp_path / "cat.jsonl", [{"question_id": "existence/1.jpg", "text": "q",
                                                      "category": "count"}])
    with pytest.raises(EvalDataError, match=r"category 'count' is not the subtask of 'existence/1.jpg'"):
        convert("mme", release, questions=wrong_category)
    broken = _mme_release(tmp_path / "broken", extra_lines=["Is there a tram? Please answer yes or no.\tMaybe\n"])
    with pytest.raises(EvalDataError, match=r"2.txt:3: 'Is there a tram\? .*\\tMaybe' is not 'question<TAB>Yes'"):
        convert("mme", broken, questions=llava)
    with pytest.raises(EvalDataError, match=r"not a directory"):
        convert("mme", llava, questions=llava)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match=r"empty: no '<subtask>/\[questions_answers_YN/\]\*.txt' answer files"):
        convert("mme", tmp_path / "empty", questions=llava)
    # A subset of the questions: the rest of the answer files is counted out.
    subset = convert("mme", release, questions=_llava_mme(tmp_path / "subset.jsonl", LLAVA_MME[:2]))
    assert len(subset.ground_truth) == 2 and subset.unmatched_annotations == 4


# ----- the CLI -----------------------------------------------------------------------------------------
def test_cli_convert_writes_atomically_and_exits_2_on_bad_input(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "textvqa" / "ground_truth.jsonl"
    ann = _textvqa_annotations(tmp_path)
    llava = _llava_textvqa(tmp_path / "llava.jsonl", LLAVA_TEXTVQA)
    rc = main(["eval", "convert", "--benchmark", "textvqa", "--annotations", str(ann), "--out", str(out),
               "--questions", str(llava)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["questions"] == str(out.parent / "questions.jsonl")
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}

    # A failing conversion leaves both existing files as they were, and no temporary file behind.
    bad = _llava_textvqa(tmp_path / "bad.jsonl", [*LLAVA_TEXTVQA, ("0000", "Who?", "")])
    rc = main(["eval", "convert", "--benchmark", "textvqa", "--annotations", str(ann), "--out", str(out),
               "--questions", str(bad)])
    assert rc == 2
    assert "no annotated question 'Who?' on image '0000'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before

    rc = main(["eval", "convert", "--benchmark", "vqav2", "--annotations", str(tmp_path / "missing.json"),
               "--out", str(out)])
    assert rc == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_convert_offers_exactly_the_converters(tmp_path, capsys):
    """The CLI's --benchmark choices are the converter's list: an unconvertible benchmark is refused by name
    with every convertible one listed, before any file is read."""
    from jobs.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "convert", "--benchmark", "synthetic", "--annotations", str(tmp_path / "missing.json"),
              "--out", str(tmp_path / "ground_truth.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'synthetic'" in err and all(f"'{name}'" in err for name in CONVERTIBLE)

def test_every_benchmark_of_the_suite_converts():
    assert sorted(CONVERTIBLE) == sorted(["vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mme", "mmbench",
                                          "seed"])


# ----- VizWiz ------------------------------------------------------------------------------------------
def _vizwiz_answers(*answers):
    return [{"answer": a, "answer_confidence": "yes"} for a in answers]


VIZWIZ_VAL = [
    {"image": "VizWiz_val_00000000.jpg", "question": "What is this? ", "answer_type": "other", "answerable": 1,
     "answers": _vizwiz_answers(*["basil"] * 7, *["basil leaves"] * 3)},
    {"image": "VizWiz_val_00000001.jpg", "question": "What colour is my shirt?", "answer_type": "unanswerable",
     "answerable": 0, "answers": _vizwiz_answers(*["unanswerable"] * 10)},
    {"image": "VizWiz_val_00000002.jpg", "question": "Is the light on?", "answer_type": "yes/no", "answerable": 1,
     "answers": _vizwiz_answers(*["yes"] * 10)},
]


def test_vizwiz_val_questions_ground_truth_and_score(tmp_path):
    root = tmp_path / "eval"
    val = _json(tmp_path / "val.json", VIZWIZ_VAL)
    summary = convert_files("vizwiz", val, root / "vizwiz" / "ground_truth.jsonl")
    assert summary["records"] == 3 and summary["questions"] == str(root / "vizwiz" / "questions.jsonl")
    # LLaVA's layout: question_id = position in the file, the question as asked, both instruction lines.
    questions = load_jsonl(root / "vizwiz" / "questions.jsonl")
    assert questions[0] == {"question_id": 0, "image": "VizWiz_val_00000000.jpg",
                            "text": f"What is this? \n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}", "category": "default"}
    assert load_jsonl(root / "vizwiz" / "ground_truth.jsonl")[1] == {
        "question_id": 1, "answers": ["unanswerable"] * 10, "answer_type": "unanswerable", "answerable": 0}

    # q0 "Basil" matches 7 annotators -> 1.0; q1 "Unanswerable" -> 1.0; q2 "No" -> 0.
    data, metrics = _answer_and_score("vizwiz", root, tmp_path, {0: "Basil", 1: "Unanswerable", 2: "No"})
    assert data.items[1].text.startswith("What colour is my shirt?\n")
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["per_answer_type"] == {"other": 100.0, "yes/no": 0.0, "unanswerable": 100.0}


def test_vizwiz_bad_inputs_name_the_problem(tmp_path):
    test = _json(tmp_path / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "What is this?"}])
    with pytest.raises(EvalDataError, match=r"test.json: record 0 \(VizWiz_test_00000000.jpg\) has no 'answers'.*"
                                            r"not public.*--annotations val.json"):
        convert("vizwiz", test)
    val = _json(tmp_path / "val.json", VIZWIZ_VAL)
    with pytest.raises(EvalDataError, match=r"vizwiz takes no question file"):
        convert("vizwiz", val, questions=test)
    broken = _json(tmp_path / "broken.json", [VIZWIZ_VAL[0], {**VIZWIZ_VAL[1], "answerable": True}])
    with pytest.raises(EvalDataError, match=r"broken.json: record 1 \(VizWiz_val_00000001.jpg\): answerable True"):
        convert("vizwiz", broken)
    _json(broken, [{**VIZWIZ_VAL[0], "answer_type": "colour"}])
    with pytest.raises(EvalDataError, match=r"record 0 .*answer_type 'colour' is not one of"):
        convert("vizwiz", broken)
    with pytest.raises(EvalDataError, match=r"a JSON dict; expected VizWiz's <split>.json"):
        convert("vizwiz", _json(tmp_path / "obj.json", {"annotations": VIZWIZ_VAL}))


# ----- POPE --------------------------------------------------------------------------------------------
POPE = {  # split -> [(image, question, label)], POPE's own ids 1.. per file
    "adversarial": [("COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
                    ("COCO_val2014_000000310196.jpg", "Is there a backpack in the image?", "no")],
    "popular": [("COCO_val2014_000000310196.jpg", "Is there a dining table in the image?", "no"),
                ("COCO_val2014_000000210789.jpg", "Is there an umbrella in the imange?", "yes")],
    "random": [("COCO_val2014_000000310196.jpg", "Is there a car in the image?", "no"),
               ("COCO_val2014_000000210789.jpg", "Is there a truck in the image?", "yes")],
}


def _pope_dir(root, splits=POPE):
    for split, rows in splits.items():
        _jsonl(root / f"coco_pope_{split}.json", [
            {"question_id": i, "image": image, "text": text, "label": label}
            for i, (image, text, label) in enumerate(rows, start=1)
        ])
    return root


def _llava_pope(path, order=("adversarial", "random", "popular")):
    """LLaVA's llava_pope_test.jsonl layout: splits in its order, ids offset per split, instruction appended."""
    return _jsonl(path, [
        {"question_id": POPE_ID_OFFSETS[split] + i, "image": image, "text": f"{text}\n{SHORT_ANSWER}", "category": split}
        for split in order for i, (image, text, _) in enumerate(POPE[split], start=1)
    ])


def test_pope_writes_llavas_question_file_and_scores_with_overall(tmp_path):
    root = tmp_path / "eval"
    annotations = _pope_dir(tmp_path / "coco")
    summary = convert_files("pope", annotations, root / "pope" / "ground_truth.jsonl")
    assert summary["records"] == 6
    written = load_jsonl(root / "pope" / "questions.jsonl")
    # The file written is LLaVA's own: same ids, order, text and split.
    assert written == load_jsonl(_llava_pope(tmp_path / "llava_pope_test.jsonl"))
    assert [q["question_id"] for q in written] == [1, 2, 10000001, 10000002, 20000001, 20000002]
    truth = load_jsonl(root / "pope" / "ground_truth.jsonl")
    assert truth[5] == {"question_id": 20000002, "answer": "yes", "category": "popular"}

    # adversarial: both right; random: "yes" on a "no" (FP) and on a "yes" (TP); popular: both wrong.
    texts = {1: "Yes", 2: "No", 10000001: "Yes", 10000002: "Yes, a truck.", 20000001: "Yes", 20000002: "No"}
    _, metrics = _answer_and_score("pope", root, tmp_path, texts)
    assert metrics["random"] == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 100.0})
    assert metrics["overall"]["accuracy"] == pytest.approx((100 + 50 + 0) / 3)
    assert metrics["overall"]["f1"] == pytest.approx((100 + 200 / 3 + 0) / 3)


def test_pope_with_llavas_question_file_keeps_its_ids(tmp_path):
    annotations = _pope_dir(tmp_path / "coco")
    llava = _llava_pope(tmp_path / "llava_pope_test.jsonl")
    result = convert("pope", annotations, questions=llava)
    assert result.questions is None  # LLaVA's file is used as it is
    assert result.ground_truth == convert("pope", annotations).ground_truth
    # One split's file alone: that split's questions of LLaVA's file are paired, the others refused by name.
    single = convert("pope", annotations / "coco_pope_random.json")
    assert [g["question_id"] for g in single.ground_truth] == [10000001, 10000002]
    with pytest.raises(EvalDataError, match=r"record 1: category 'adversarial' has no annotation file "
                                            r"coco_pope_adversarial.json.*annotated: random"):
        convert("pope", annotations / "coco_pope_random.json", questions=llava)


def test_pope_bad_inputs_name_the_problem(tmp_path):
    annotations = _pope_dir(tmp_path / "coco")
    # LLaVA's eval_pope.py pairs by position: a reordered split is caught by its image / question.
    swapped = _llava_pope(tmp_path / "swapped.jsonl")
    rows = load_jsonl(swapped)
    rows[0], rows[1] = rows[1], rows[0]
    _jsonl(swapped, rows)
    with pytest.raises(EvalDataError, match=r"swapped.jsonl: record 1: adversarial question 1 .*backpack.* is not "
                                            r"question 1 of coco_pope_adversarial.json .*snowboard"):
        convert("pope", annotations, questions=swapped)
    extra = _jsonl(tmp_path / "extra.jsonl", [*load_jsonl(_llava_pope(tmp_path / "l.jsonl")),
                                              {"question_id": 3, "image": "x.jpg", "text": "Is there a cat?",
                                               "category": "adversarial"}])
    with pytest.raises(EvalDataError, match=r"extra.jsonl: record 7: more adversarial questions than"):
        convert("pope", annotations, questions=extra)
    bad = _pope_dir(tmp_path / "bad", {"random": [("a.jpg", "Is there a cat?", "maybe")]})
    with pytest.raises(EvalDataError, match=r"coco_pope_random.json: record 1 \(question_id 1\): label 'maybe'"):
        convert("pope", bad)
    (bad / "coco_pope_random.json").rename(bad / "coco_pope_hard.json")
    with pytest.raises(EvalDataError, match=r"coco_pope_hard.json: not a COCO POPE split file.*adversarial, random, "
                                            r"popular"):
        convert("pope", bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match=r"empty: no coco_pope_<split>.json files"):
        convert("pope", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing"):
        convert("pope", tmp_path / "missing")


# ----- ScienceQA ---------------------------------------------------------------------------------------
SQA_PROBLEMS = {
    "1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
          "image": "image.png", "split": "test", "subject": "natural science"},
    "2": {"question": "Which planet is largest?", "choices": ["Mercury", "Venus", "Earth", "Mars", "Jupiter"],
          "answer": 4, "hint": "Look at the chart.", "image": "image.png", "split": "test"},
    "3": {"question": "Which word is a noun?", "choices": ["run", "dog", "quickly"], "answer": 1, "hint": "",
          "image": None, "split": "test"},
    "4": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "", "image": None,
          "split": "train"},
}


def _sqa_files(folder, problems=SQA_PROBLEMS, test=("1", "2", "3")):
    _json(folder / "problems.json", problems)
    _json(folder / "pid_splits.json", {"train": ["4"], "val": [], "test": list(test)})
    return folder / "problems.json"


def _llava_sqa(path, pids=("1", "2", "3"), problems=SQA_PROBLEMS):
    """LLaVA's llava_test_CQM-A.json: the CQM question, "<image>" after it and an image path for image problems."""
    records = []
    for pid in pids:
        problem, cqm = problems[pid], scienceqa_question_text(problems[pid])
        answer = f"The answer is {'ABCDE'[problem['answer']]}."
        if problem["image"] is None:
            records.append({"id": pid, "conversations": [{"from": "human", "value": cqm},
                                                         {"from": "gpt", "value": answer}]})
        else:
            records.append({"id": pid, "image": f"{pid}/{problem['image']}",
                            "conversations": [{"from": "human", "value": f"{cqm}\n<image>"},
                                              {"from": "gpt", "value": answer}]})
    return _json(path, records)


def test_scienceqa_ground_truth_five_choices_and_score(tmp_path):
    root = tmp_path / "eval"
    problems = _sqa_files(tmp_path / "scienceqa-data")
    llava = _llava_sqa(root / "scienceqa" / "llava_test_CQM-A.json")
    summary = convert_files("scienceqa", problems, root / "scienceqa" / "ground_truth.jsonl", questions=llava)
    assert summary["questions"] is None and summary["unmatched_annotations"] == 1  # the train problem
    truth = load_jsonl(root / "scienceqa" / "ground_truth.jsonl")
    assert truth == [
        {"question_id": "1", "answer": "B", "num_choices": 2, "has_image": True},
        {"question_id": "2", "answer": "E", "num_choices": 5, "has_image": True},
        {"question_id": "3", "answer": "B", "num_choices": 3, "has_image": False},
    ]
    # Without LLaVA's file, pid_splits.json's test split gives the same ground truth.
    assert convert("scienceqa", problems).ground_truth == truth

    # "E" on the five-choice problem is right (the reported bug: a ground truth assuming four choices
    # refused it); "The answer is C." on a two-choice one is past its choices: wrong. IMG: 2 image problems.
    data, metrics = _answer_and_score("scienceqa", root, tmp_path, {"1": "The answer is C.", "2": "E", "3": "B"})
    assert data.items[1].text.endswith(f"(E) Jupiter\n{MULTIPLE_CHOICE}")
    assert metrics == pytest.approx({"accuracy": 200 / 3, "img_accuracy": 50.0})


def test_scienceqa_bad_inputs_name_the_problem(tmp_path):
    problems = _sqa_files(tmp_path / "ok")
    six = {**SQA_PROBLEMS, "3": {**SQA_PROBLEMS["3"], "choices": list("abcdef")}}
    with pytest.raises(EvalDataError, match=r"problem '3': choices .* is not a list of 2 to 5 strings"):
        convert("scienceqa", _sqa_files(tmp_path / "six", six))
    past = {**SQA_PROBLEMS, "2": {**SQA_PROBLEMS["2"], "answer": 5}}
    with pytest.raises(EvalDataError, match=r"problem '2': answer 5 is not an index into its 5 choices"):
        convert("scienceqa", _sqa_files(tmp_path / "past", past))
    no_image = {**SQA_PROBLEMS, "1": {**SQA_PROBLEMS["1"], "image": None}}
    with pytest.raises(EvalDataError, match=r"record 1: problem '1' has image in the question file but has no image"):
        convert("scienceqa", _sqa_files(tmp_path / "noimg", no_image), questions=_llava_sqa(tmp_path / "l.json"))
    with pytest.raises(EvalDataError, match=r"pid_splits.json: test\[1\]: problem '9' is not in"):
        convert("scienceqa", _sqa_files(tmp_path / "nine", test=("1", "9")))
    alone = _json(tmp_path / "alone" / "problems.json", SQA_PROBLEMS)
    with pytest.raises(EvalDataError, match=r"pid_splits.json not found: pass LLaVA's llava_test_CQM-A.json"):
        convert("scienceqa", alone)
    with pytest.raises(EvalDataError, match=r"expected LLaVA's llava_test_CQM-A.json \(a JSON array\)"):
        convert("scienceqa", problems, questions=tmp_path / "ok" / "pid_splits.json")
    (tmp_path / "rep.json").write_text('{"1": ' + json.dumps(SQA_PROBLEMS["1"]) + ', "1": '
                                       + json.dumps(SQA_PROBLEMS["3"]) + "}")
    with pytest.raises(EvalDataError, match=r"rep.json: problem id '1' occurs more than once"):
        convert("scienceqa", tmp_path / "rep.json", questions=_llava_sqa(tmp_path / "one.json", ("1",)))


# ----- MMBench -----------------------------------------------------------------------------------------
def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 90, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category", "split",
              "image"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


MMBENCH_ROWS = [
    [0, "What animal?", "nan", "cat", "dog", "", "", "", "B", "attr", "l2", "dev", _png_b64()],
    [1000000, "What animal?", "nan", "dog", "cat", "", "", "", "A", "attr", "l2", "dev", "0"],
    [1, "Which planet?", "nan", "Mercury", "Venus", "Earth", "Mars", "Jupiter", "E", "astro", "l2", "dev",
     _png_b64()],
]


def test_mmbench_ground_truth_from_the_tsv_and_score(tmp_path):
    root = tmp_path / "eval"
    tsv = _mmbench_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", MMBENCH_ROWS)
    summary = convert_files("mmbench", tsv, root / "mmbench" / "ground_truth.jsonl")
    assert summary["records"] == 3 and summary["questions"] is None
    truth = load_jsonl(root / "mmbench" / "ground_truth.jsonl")
    assert truth[2] == {"question_id": 1, "answer": "E",
                        "options": {"A": "Mercury", "B": "Venus", "C": "Earth", "D": "Mars", "E": "Jupiter"}}
    # q0 and its rotation right, q1 (answer E of five) right -> circular 2/2.
    _, metrics = _answer_and_score("mmbench", root, tmp_path, {0: "B", 1_000_000: "A. dog", 1: "E"})
    assert metrics == {"circular_accuracy": 100.0, "single_accuracy": 100.0}
    _, metrics = _answer_and_score("mmbench", root, tmp_path, {0: "B", 1_000_000: "B", 1: "D"})
    assert metrics == {"circular_accuracy": 0.0, "single_accuracy": 50.0}


def test_mmbench_bad_inputs_name_the_problem(tmp_path):
    tsv = _mmbench_tsv(tmp_path / "dev.tsv", MMBENCH_ROWS)
    with pytest.raises(EvalDataError, match=r"mmbench takes no question file"):
        convert("mmbench", tsv, questions=tsv)
    test_split = _mmbench_tsv(tmp_path / "test.tsv", [[*MMBENCH_ROWS[0][:8], "", *MMBENCH_ROWS[0][9:]]])
    with pytest.raises(EvalDataError, match=r"test.tsv: row 2 \(index 0\) has no answer \(a test split\?\)"):
        convert("mmbench", test_split)
    past = _mmbench_tsv(tmp_path / "past.tsv", [[*MMBENCH_ROWS[0][:8], "C", *MMBENCH_ROWS[0][9:]]])
    with pytest.raises(EvalDataError, match=r"past.tsv: row 2 \(index 0\): answer 'C' is not one of its options"):
        convert("mmbench", past)
    clash = _mmbench_tsv(tmp_path / "clash.tsv", [MMBENCH_ROWS[0], [*MMBENCH_ROWS[0][:8], "A", *MMBENCH_ROWS[0][9:]]])
    with pytest.raises(EvalDataError, match=r"clash.tsv: question_id 0 occurs twice with different ground truth"):
        convert("mmbench", clash)


# ----- SEED-Bench --------------------------------------------------------------------------------------
def _seed_question(qid, answer, type_id, data_type="image", data_id="1454426_2591111986"):
    return {"answer": answer, "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
            "data_id": data_id, "data_type": data_type, "question": "How many towels are in the image?",
            "question_id": qid, "question_type_id": type_id}


SEED = {
    "questions": [
        _seed_question("101669", "A", 5),
        _seed_question("101670", "D", 1),
        _seed_question("v1738", "B", 10, data_type="video", data_id="94328.webm"),
    ],
    "question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10},
}


def test_seed_ground_truth_ids_as_llava_casts_them_and_score(tmp_path):
    root = tmp_path / "eval"
    annotations = _json(tmp_path / "SEED-Bench.json", SEED)
    assert [seed_question_id(q["question_id"]) for q in SEED["questions"]] == [101669, 101670, "v1738"]
    everything = convert("seed", annotations)
    assert everything.ground_truth[2] == {"question_id": "v1738", "answer": "B", "question_type_id": 10,
                                          "category": "Action Recognition", "data_type": "video"}
    # LLaVA's llava-seed-bench.jsonl (here without the video question): exactly its questions are kept.
    llava = _jsonl(root / "seed_bench" / "llava-seed-bench.jsonl", [
        {"question_id": 101670, "image": "SEED-Bench-image/1454426_2591111986.jpg", "category": "Scene Understanding",
         "text": f"How many?\nA. One\nB. Two\nC. Three\nD. Four\n{MULTIPLE_CHOICE}"},
        {"question_id": 101669, "image": "SEED-Bench-image/1454426_2591111986.jpg", "category": "Instances Counting",
         "text": f"How many?\nA. One\nB. Two\nC. Three\nD. Four\n{MULTIPLE_CHOICE}"},
    ])
    summary = convert_files("seed", annotations, root / "seed_bench" / "ground_truth.jsonl", questions=llava)
    assert summary["records"] == 2 and summary["unmatched_annotations"] == 1
    assert [g["question_id"] for g in load_jsonl(root / "seed_bench" / "ground_truth.jsonl")] == [101670, 101669]
    _, metrics = _answer_and_score("seed", root, tmp_path, {101670: "D", 101669: "E"})
    assert metrics["accuracy"] == 50.0
    assert metrics["per_category"] == {"Instances Counting": 0.0, "Scene Understanding": 100.0}
    assert metrics["per_data_type"] == {"image": 50.0}


def test_seed_bad_inputs_name_the_problem(tmp_path):
    def seed_with(question):
        return _json(tmp_path / "SEED-Bench.json", {**SEED, "questions": [*SEED["questions"], question]})

    with pytest.raises(EvalDataError, match=r"questions\[3\] \(question_id '7'\): answer 'E' is not one of"):
        convert("seed", seed_with(_seed_question("7", "E", 1)))
    with pytest.raises(EvalDataError, match=r"questions\[3\] \(question_id '7'\): question_type_id 13 is not one of"):
        convert("seed", seed_with(_seed_question("7", "A", 13)))
    with pytest.raises(EvalDataError, match=r"question_id 101669 occurs twice with different ground truth"):
        convert("seed", seed_with(_seed_question("101669", "C", 5)))
    annotations = _json(tmp_path / "SEED-Bench.json", SEED)
    string_ids = _jsonl(tmp_path / "llava.jsonl", [{"question_id": "101669", "text": "q"}])
    with pytest.raises(EvalDataError, match=r"llava.jsonl: record 1: question_id '101669' has no annotation .*"
                                            r"digits as int"):
        convert("seed", annotations, questions=string_ids)
    with pytest.raises(EvalDataError, match=r"no 'questions' list and 'question_type' object"):
        convert("seed", _json(tmp_path / "other.json", {"questions": []}))


# ----- the CLI, continued -----------------------------------------------------------------------------------------
def test_cli_convert_then_score_pope(tmp_path, capsys):
    """`dpn eval convert --benchmark pope` on the annotation folder, then `dpn eval score`: the overall prints."""
    from jobs.cli import main

    out = tmp_path / "pope" / "ground_truth.jsonl"
    assert main(["eval", "convert", "--benchmark", "pope", "--annotations", str(_pope_dir(tmp_path / "coco")),
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 6 and summary["questions"] == str(tmp_path / "pope" / "questions.jsonl")
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question_id": q["question_id"], "text": "Yes"}
                                                  for q in load_jsonl(tmp_path / "pope" / "questions.jsonl")])
    assert main(["eval", "score", "--benchmark", "pope", "--predictions", str(answers), "--ground-truth",
                 str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # "Yes" to everything: each split half right, precision 50, recall 100, F1 2/3, yes ratio 100.
    assert printed["overall"] == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 100.0})
    assert main(["eval", "convert", "--benchmark", "pope", "--annotations", str(tmp_path / "nowhere"),
                 "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
