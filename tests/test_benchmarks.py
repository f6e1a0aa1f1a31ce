"""Benchmark adapters read LLaVA-1.5's published question layouts into the exact prompts its eval
scripts build; the answer writer produces LLaVA answer files the scorer reads back."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from dpn.eval.benchmarks import (
    BENCHMARKS,
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    EvalItem,
    answer_record,
    get_benchmark,
    scienceqa_question_text,
    write_answers,
)
from dpn.eval.scoring import SCORERS, EvalDataError, load_jsonl, score


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_registry_names_match_the_scorers():
    assert set(BENCHMARKS) == set(SCORERS) == {
        "vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmbench", "seed", "vizwiz", "synthetic",
    }
    assert all(adapter.name == name for name, adapter in BENCHMARKS.items())
    assert BENCHMARKS["vizwiz"].suffix == f"{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
    assert BENCHMARKS["seed"].suffix == MULTIPLE_CHOICE
    with pytest.raises(EvalDataError, match=r"unknown benchmark 'mmb'"):
        get_benchmark("mmb")


def test_jsonl_questions_pass_text_through(tmp_path):
    text = f"What is in the bowl?\n{SHORT_ANSWER}"
    path = _jsonl(tmp_path / "q.jsonl", [
        {"question_id": 7, "image": "val/1.jpg", "text": text, "category": "default"},
        {"question_id": "7", "image": "val/2.jpg", "text": "Is there a dog?", "category": "random", "label": "yes"},
        {"question_id": 9, "text": "Text only?"},
    ])
    items = list(get_benchmark("pope").read(path, image_root=tmp_path / "imgs"))
    assert [i.question_id for i in items] == [7, "7", 9]  # ids keep their JSON type
    assert items[0].text == text  # LLaVA's files carry the instruction: unchanged
    assert items[0].image == str(tmp_path / "imgs" / "val/1.jpg")
    assert items[1].category == "random" and items[1].extra == {"label": "yes"}
    assert items[2].image is None and not items[2].has_image and items[2].open_image() is None

    # For bare questions the instruction is appended once, after a newline.
    items = list(get_benchmark("pope").read(path, append_suffix=True))
    assert items[0].text == text
    assert items[1].text == f"Is there a dog?\n{SHORT_ANSWER}"
    assert items[1].image == "val/2.jpg"
    vizwiz = list(get_benchmark("vizwiz").read(path, append_suffix=True))
    assert vizwiz[2].text == f"Text only?\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
    # The synthetic benchmark fixes no instruction.
    assert list(get_benchmark("synthetic").read(path, append_suffix=True))[2].text == "Text only?"


def test_jsonl_questions_errors_name_file_and_record(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 2}])
    with pytest.raises(EvalDataError, match=rf"{path}: record 2 has no 'text'"):
        list(get_benchmark("gqa").read(path))
    _jsonl(path, [{"question_id": 1.5, "text": "a"}])
    with pytest.raises(EvalDataError, match=rf"{path}: record 1: question_id 1.5 is a float"):
        list(get_benchmark("gqa").read(path))


def test_scienceqa_prompt(tmp_path):
    problem = {"question": "Which is a mammal?", "hint": "", "choices": ["frog", "whale"], "answer": 1}
    cqm = scienceqa_question_text(problem)
    assert cqm == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale"
    # Double spaces collapse (LLaVA's converter replaces "  " by " " once).
    assert scienceqa_question_text({**problem, "hint": "Look  closely."}).startswith("Context: Look closely.\n")

    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([
        {"id": "4", "image": "4/image.png",
         "conversations": [{"from": "human", "value": f"{cqm}\n<image>"}, {"from": "gpt", "value": "B"}]},
        {"id": "5", "conversations": [{"from": "human", "value": cqm}, {"from": "gpt", "value": "B"}]},
    ]))
    img, txt = get_benchmark("scienceqa").read(path, image_root="/data/sqa/test")
    assert img.question_id == "4" and img.image == "/data/sqa/test/4/image.png"
    assert img.text == f"{cqm}\n{MULTIPLE_CHOICE}"  # "<image>" removed, instruction appended
    assert img.record_prompt == f"<image>\n{cqm}\n{MULTIPLE_CHOICE}"  # the answer file's prompt
    assert img.extra == {"has_image": True}
    assert txt.image is None and txt.text == img.text and txt.record_prompt == txt.text
    assert txt.extra == {"has_image": False}


def _png_b64(size=(5, 3)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _mmbench_tsv(path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = [
        [0, "What animal is shown?", "It lives in water.", "fish", "dog", "bird", "", "A", "attr", "l2", "dev",
         _png_b64()],
        # The rotated copy (index + 1e6) refers to the original's picture by index.
        [1000000, "What animal is shown?", "It lives in water.", "dog", "bird", "fish", "", "C", "attr", "l2",
         "dev", "0"],
        [1, "Which colour?", "nan", "red", "blue", "green", "yellow", "D", "color", "l2", "dev", _png_b64((2, 2))],
    ]
    return _tsv(path, header, rows)


def test_mmbench_tsv(tmp_path):
    path = _mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    adapter = get_benchmark("mmbench")
    first, rotated, colour = adapter.read(path)
    # hint + "\n" + question, options up to the first empty one, then the instruction.
    assert first.question_id == 0
    assert first.text == (
        "It lives in water.\nWhat animal is shown?\nA. fish\nB. dog\nC. bird\n" + MULTIPLE_CHOICE
    )
    assert first.record_prompt == "It lives in water.\nWhat animal is shown?\nA. fish\nB. dog\nC. bird"
    assert first.extra["options"] == {"A": "fish", "B": "dog", "C": "bird"}
    assert first.category == "attr"
    assert first.open_image().size == (5, 3)
    assert rotated.question_id == 1_000_000 and rotated.open_image().size == (5, 3)
    # "nan" hint is no hint; four options.
    assert colour.text == f"Which colour?\nA. red\nB. blue\nC. green\nD. yellow\n{MULTIPLE_CHOICE}"
    assert colour.open_image().mode == "RGB"

    gt = adapter.ground_truth(path)
    assert gt[1] == {"question_id": 1_000_000, "answer": "C", "options": {"A": "dog", "B": "bird", "C": "fish"}}
    # Round trip through the answer writer and the circular scorer: q0 and its rotation right
    # (the rotation by option text "fish" -> C), q1 wrong -> circular 1/2, single 1/2.
    answers = tmp_path / "answers.jsonl"
    texts = {0: "A", 1_000_000: "It is a fish", 1: "A"}
    write_answers(answers, (answer_record(i, texts[i.question_id], model_id="m") for i in (first, rotated, colour)))
    assert score("mmbench", load_jsonl(answers), gt) == {"circular_accuracy": 50.0, "single_accuracy": 50.0}


def test_mmbench_tsv_with_an_e_column(tmp_path):
    """The MMBench TSV format allows a fifth option (the official loader reads A-E): an E column is read,
    so a question answered E is in the prompt, the ground truth and the scorer's reach; an empty E cell
    (a 4-option row of the same file) ends the options as before."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "image"]
    path = _tsv(tmp_path / "five.tsv", header, [
        [0, "Which planet?", "nan", "Mercury", "Venus", "Earth", "Mars", "Jupiter", "E", "astro", _png_b64()],
        [1, "Which colour?", "nan", "red", "blue", "green", "yellow", "", "D", "color", _png_b64()],
    ])
    five, four = get_benchmark("mmbench").read(path)
    assert five.text.endswith(f"D. Mars\nE. Jupiter\n{MULTIPLE_CHOICE}")
    assert five.extra["options"] == {"A": "Mercury", "B": "Venus", "C": "Earth", "D": "Mars", "E": "Jupiter"}
    assert list(four.extra["options"]) == ["A", "B", "C", "D"]
    gt = get_benchmark("mmbench").ground_truth(path)
    assert [g["answer"] for g in gt] == ["E", "D"]
    assert score("mmbench", [{"question_id": 0, "text": "E"}, {"question_id": 1, "text": "E"}], gt) == {
        "circular_accuracy": 50.0, "single_accuracy": 50.0}  # E right on the 5-option row, wrong on the other


def test_mmbench_ground_truth_refuses_an_answer_outside_the_options(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image"]
    path = _tsv(tmp_path / "bad.tsv", header, [
        [0, "Which?", "nan", "x", "y", "z", "w", "A", _png_b64()],
        [7, "Which?", "nan", "x", "y", "", "", "C", _png_b64()],  # C is empty: only A and B exist
    ])
    with pytest.raises(EvalDataError, match=rf"{path}: row 3 \(index 7\): answer 'C' is not one of its options"):
        get_benchmark("mmbench").ground_truth(path)


def test_answer_writer_round_trip(tmp_path):
    items = [EvalItem(question_id=3, text=f"Q?\n{SHORT_ANSWER}", image="a.jpg"),
             EvalItem(question_id="3", text="R?", answer_prompt="<image>\nR?")]
    record = answer_record(items[0], "yes", model_id="dpn-7b", answer_id="fixed", metadata={"flops": 1.5})
    assert record == {"question_id": 3, "prompt": f"Q?\n{SHORT_ANSWER}", "text": "yes", "answer_id": "fixed",
                      "model_id": "dpn-7b", "metadata": {"flops": 1.5}}
    generated = answer_record(items[1], "no", model_id="dpn-7b")
    assert generated["prompt"] == "<image>\nR?" and len(generated["answer_id"]) == 32
    assert generated["answer_id"] != answer_record(items[1], "no", model_id="dpn-7b")["answer_id"]

    path = tmp_path / "out" / "answers.jsonl"
    assert write_answers(path, [record, generated]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["answers.jsonl"]  # no temporary left behind
    back = load_jsonl(path)
    assert [r["question_id"] for r in back] == [3, "3"]
    gt = [{"question_id": 3, "answer": "yes"}, {"question_id": "3", "answer": "yes"}]
    assert score("gqa", back, gt) == {"accuracy": 50.0}


def test_eval_item_validation():
    with pytest.raises(EvalDataError, match=r"question_id None"):
        EvalItem(question_id=None, text="x")  # type: ignore[arg-type]
    with pytest.raises(EvalDataError, match=r"both an image path and inline image bytes"):
        EvalItem(question_id=1, text="x", image="a.png", image_bytes=b"...")


def test_open_image_from_path(tmp_path):
    Image.new("L", (4, 6)).save(tmp_path / "g.png")
    (item,) = get_benchmark("gqa").read(
        _jsonl(tmp_path / "q.jsonl", [{"question_id": "1", "image": "g.png", "text": "q"}]), image_root=tmp_path
    )
    img = item.open_image()
    assert img.mode == "RGB" and img.size == (4, 6)
