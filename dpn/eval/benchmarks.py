"""Task adapters for the LLaVA-1.5 evaluation suite, in its published file layouts, and the answer writer.

An adapter reads a benchmark's question file and yields `EvalItem`s whose `text` is the human turn
exactly as LLaVA-1.5's eval scripts send it, minus the image placeholder: the prompt builder puts
`"<image>\\n"` in front when the item has an image (LLaVA's `model_vqa_loader.py` with
`mm_use_im_start_end=False`) and, for DPN, appends `<ROUTER>` (dpn/conversation.py, not here).

What each benchmark's `text` holds (LLaVA-1.5's files, from its eval.zip, carry the instruction already,
and the jsonl adapters pass `text` through unchanged, as `model_vqa_loader.py` does):

| benchmark | question file | `text` |
| --- | --- | --- |
| vqav2 | llava_vqav2_mscoco_test-dev2015.jsonl | question + "\\n" + SHORT_ANSWER |
| gqa | llava_gqa_testdev_balanced.jsonl | question + "\\n" + SHORT_ANSWER |
| vizwiz | llava_test.jsonl | question + "\\n" + VIZWIZ_UNANSWERABLE + "\\n" + SHORT_ANSWER |
| textvqa | llava_textvqa_val_v051_ocr.jsonl | question + "\\nReference OCR token: " + tokens + "\\n" + SHORT_ANSWER (the OCR line is omitted when there are no tokens) |
| pope | llava_pope_test.jsonl | question + "\\n" + SHORT_ANSWER; `category` = adversarial / popular / random |
| mme | llava_mme.jsonl (re-keyed by `dpn eval convert --benchmark mme`: its question_id is the image path, shared by the image's two questions) | MME question + "\\n" + SHORT_ANSWER (LLaVA's MME converter strips that line and restores " Please answer yes or no." to look answers up); `category` = subtask |
| seed | llava-seed-bench.jsonl | question + "\\nA. ..\\nB. ..\\nC. ..\\nD. .." + "\\n" + MULTIPLE_CHOICE |
| scienceqa | llava_test_CQM-A.json (JSON array of conversations) | "Context: ..\\nQuestion: ..\\nOptions: (A) .. (B) .." + "\\n" + MULTIPLE_CHOICE, built here (`model_vqa_science.py --single-pred-prompt`) |
| mmbench | mmbench_dev_20230712.tsv | [hint + "\\n"] + question + "\\nA. ..\\nB. .." (the TSV's letter columns A, B, .. up to the first empty one: A-D in MMBench, E where a TSV has it) + "\\n" + MULTIPLE_CHOICE, built here (`model_vqa_mmbench.py --single-pred-prompt`); image inline (base64) |
| synthetic | `dpn synth`'s DIR/eval/*.jsonl | as written by `dpn synth` (LLaVA's instructions); `difficulty` etc. land in `extra` |

`append_suffix=True` appends the benchmark's instruction to question files that hold bare questions
(not to text that already ends with it). For TextVQA that adds only the short-answer line: the OCR
reference line comes from the file.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import string
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpn.eval.scoring import EvalDataError, load_jsonl

if TYPE_CHECKING:
    from PIL import Image

# LLaVA-1.5's instructions (docs/Evaluation.md and the eval files).
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."

QuestionId = int | str


@dataclass(kw_only=True, frozen=True)
class EvalItem:
    """One benchmark question, ready for the prompt builder."""

    question_id: QuestionId
    """As in the question file, type kept (int or str): the answer file and the scorer join on it."""
    text: str
    """The human turn without the image placeholder, instruction included (see the module table)."""
    image: str | None = None
    """Image path (joined with the adapter's `image_root` when one is given); None: no file."""
    image_bytes: bytes | None = None
    """Encoded image carried inline by the question file (MMBench's TSV); None otherwise."""
    category: str | None = None
    """The file's `category` (POPE split, MME subtask, SEED/MMBench category, ...), when it has one."""
    answer_prompt: str | None = None
    """The `prompt` LLaVA writes into the answer file when it is not `text` (ScienceQA: "<image>\\n"
    prefix for image questions; MMBench: without the instruction). None: `text`."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Every other field of the question record (e.g. synthetic `difficulty`, MMBench `options`)."""

    def __post_init__(self) -> None:
        if isinstance(self.question_id, bool) or not isinstance(self.question_id, int | str):
            raise EvalDataError(
                f"question_id {self.question_id!r} is a {type(self.question_id).__name__}; expected int or str"
            )
        if not isinstance(self.text, str):
            raise EvalDataError(f"question {self.question_id!r}: text {self.text!r} is not a string")
        if self.image is not None and self.image_bytes is not None:
            raise EvalDataError(f"question {self.question_id!r}: both an image path and inline image bytes")

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_bytes is not None

    @property
    def record_prompt(self) -> str:
        """The answer file's `prompt` field."""
        return self.text if self.answer_prompt is None else self.answer_prompt

    def open_image(self) -> Image.Image | None:
        """The image as RGB (as LLaVA's loaders convert it), or None for a text-only question. The file is
        read bounded (`dpn.image_io`: regular files only, size and pixel caps): EvalDataError naming the
        question otherwise, never a hang on a FIFO or a decompression bomb."""
        if not self.has_image:
            return None
        from PIL import Image

        from dpn.image_io import ImageFileError, decode_image, read_image_file

        try:
            data = read_image_file(self.image) if self.image is not None else (self.image_bytes or b"")
            with decode_image(data, max_pixels=Image.MAX_IMAGE_PIXELS) as img:
                return img.convert("RGB")
        except ImageFileError as e:
            raise EvalDataError(f"question {self.question_id!r}: image {self.image or '(inline)'}: {e.detail}") from None


def _with_suffix(text: str, suffix: str | None, append: bool) -> str:
    if append and suffix and not text.endswith(suffix):
        return f"{text}\n{suffix}"
    return text


def _join_image(image: Any, image_root: str | PathLike[str] | None, where: str) -> str | None:
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise EvalDataError(f"{where}: image {image!r} is not a non-empty path string")
    return str(Path(image_root) / image) if image_root is not None else image


@dataclass(kw_only=True, frozen=True)
class JsonlQuestions:
    """LLaVA's question jsonl: `question_id`, `text`, optional `image` and `category`; more fields
    go to `EvalItem.extra`."""

    name: str
    suffix: str | None
    """The instruction LLaVA-1.5's file ends `text` with (`append_suffix` adds it); None: none fixed."""

    def read(
        self,
        path: str | PathLike[str],
        *,
        image_root: str | PathLike[str] | None = None,
        append_suffix: bool = False,
    ) -> Iterator[EvalItem]:
        """Yield the file's questions in order. Errors name the file and record."""
        for position, record in enumerate(load_jsonl(path), start=1):
            where = f"{path}: record {position}"
            for key in ("question_id", "text"):
                if key not in record:
                    raise EvalDataError(f"{where} has no '{key}'")
            category = record.get("category")
            if category is not None and not isinstance(category, str):
                raise EvalDataError(f"{where}: category {category!r} is not a string")
            text = record["text"]
            if isinstance(text, str):
                text = _with_suffix(text, self.suffix, append_suffix)
            try:
                yield EvalItem(
                    question_id=record["question_id"],
                    text=text,
                    image=_join_image(record.get("image"), image_root, where),
                    category=category,
                    extra={k: v for k, v in record.items() if k not in ("question_id", "text", "image", "category")},
                )
            except EvalDataError as e:
                raise EvalDataError(f"{where}: {e}") from None


def scienceqa_question_text(problem: Mapping[str, Any]) -> str:
    """The "CQM" question LLaVA builds from a ScienceQA `problems.json` entry (`convert_sqa_to_llava.py`,
    no captions): "Context: <hint or N/A>\\nQuestion: <question>\\nOptions: (A) x (B) y", with double
    spaces collapsed once and the ends stripped. The instruction is appended by the adapter."""
    context = str(problem.get("hint") or "").strip() or "N/A"
    choices = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABCDE", problem["choices"], strict=False))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
    return text.replace("  ", " ").strip()


@dataclass(kw_only=True, frozen=True)
class ScienceQAQuestions:
    """LLaVA's `llava_test_CQM-A.json`: a JSON array of {id, image?, conversations}; the first human
    turn holds the CQM question (and "<image>" for image questions)."""

    name: str = "scienceqa"
    suffix: str | None = MULTIPLE_CHOICE

    def read(
        self,
        path: str | PathLike[str],
        *,
        image_root: str | PathLike[str] | None = None,
        append_suffix: bool = False,
    ) -> Iterator[EvalItem]:
        """Yield the questions. The instruction is always appended, as `--single-pred-prompt` does;
        `append_suffix` is ignored (it exists so that every adapter's `read` takes the same arguments)."""
        del append_suffix
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise EvalDataError(f"{path}: expected a JSON array of questions, got {type(records).__name__}")
        for position, record in enumerate(records, start=1):
            where = f"{path}: record {position}"
            try:
                qid = record["id"]
                value = record["conversations"][0]["value"]
            except (KeyError, IndexError, TypeError):
                raise EvalDataError(f"{where}: expected 'id' and 'conversations'[0]['value']") from None
            if not isinstance(value, str):
                raise EvalDataError(f"{where}: the first turn's value is not a string")
            # model_vqa_science.py: drop the placeholder, strip; the instruction goes after a newline.
            question = value.replace("<image>", "").strip()
            image = _join_image(record.get("image"), image_root, where)
            text = f"{question}\n{MULTIPLE_CHOICE}"
            prefix = "<image>\n" if image is not None else ""
            try:
                yield EvalItem(
                    question_id=qid,
                    text=text,
                    image=image,
                    answer_prompt=prefix + text,
                    extra={"has_image": image is not None},
                )
            except EvalDataError as e:
                raise EvalDataError(f"{where}: {e}") from None


# pandas' default NA strings (`pd.read_table`, which LLaVA's MMBench script uses) plus LLaVA's own
# `is_none` ("nan"/"none" in any case): such cells count as empty.
_TSV_MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def _tsv_missing(value: str | None) -> bool:
    return value is None or value in _TSV_MISSING or value.lower() in ("nan", "none")


@dataclass(kw_only=True, frozen=True)
class MMBenchQuestions:
    """MMBench's TSV (`mmbench_dev_20230712.tsv`): index, question, hint, A-D, answer, category,
    l2-category, split, source, image (base64). Rotated copies for circular evaluation are rows of
    their own, with index + k * 1e6. One item per row (LLaVA-1.5 runs without `--all-rounds`)."""

    name: str = "mmbench"
    suffix: str | None = MULTIPLE_CHOICE
    option_letters: str = string.ascii_uppercase
    """Option columns, read in order up to the first absent or empty one. MMBench has A-D, but its official
    loader also reads an E column and other TSVs in this format carry one; LLaVA's script reads A-D only,
    which would make an answer E unreachable."""

    def _rows(self, path: str | PathLike[str]) -> list[dict[str, str]]:
        # Inline base64 images exceed csv's default 128 KiB field limit.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            try:
                rows = list(reader)
            except csv.Error as e:
                raise EvalDataError(f"{path}: line {reader.line_num}: malformed TSV ({e})") from None
            for column in ("index", "question"):
                if column not in (reader.fieldnames or []):
                    raise EvalDataError(f"{path}: no '{column}' column (columns: {reader.fieldnames})")
        return rows

    def _index(self, row: Mapping[str, str], path: str | PathLike[str], line: int) -> int:
        try:
            return int(row["index"])
        except (TypeError, ValueError):
            raise EvalDataError(f"{path}: row {line}: index {row['index']!r} is not an integer") from None

    def options(self, row: Mapping[str, str]) -> dict[str, str]:
        """Options A, B, .. up to the first absent or empty one (LLaVA's `get_options`)."""
        options: dict[str, str] = {}
        for letter in self.option_letters:
            value = row.get(letter)
            if _tsv_missing(value):
                break
            options[letter] = value  # type: ignore[assignment]
        return options

    def read(
        self,
        path: str | PathLike[str],
        *,
        image_root: str | PathLike[str] | None = None,
        append_suffix: bool = False,
    ) -> Iterator[EvalItem]:
        """Yield one item per TSV row with its decoded image (inline, so `image_root` is unused).
        An image cell holding only digits refers to the row with that index (newer TSVs store each
        picture once). The instruction is always appended; `append_suffix` is ignored."""
        del image_root, append_suffix
        rows = self._rows(path)
        images = {self._index(r, path, i): r.get("image") for i, r in enumerate(rows, start=2)}
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            index = self._index(row, path, line)
            options = self.options(row)
            question = row["question"]
            if not _tsv_missing(row.get("hint")):
                question = f"{row['hint']}\n{question}"
            for letter, option in options.items():
                question += f"\n{letter}. {option}"
            image_cell = row.get("image")
            if image_cell is not None and image_cell.isdigit() and len(image_cell) < 16:
                image_cell = images.get(int(image_cell))
            image_bytes = None
            if not _tsv_missing(image_cell):
                try:
                    image_bytes = base64.b64decode(image_cell, validate=True)  # type: ignore[arg-type]
                except (binascii.Error, ValueError):
                    raise EvalDataError(f"{path}: row {line} (index {index}): image is not valid base64") from None
            yield EvalItem(
                question_id=index,
                text=f"{question}\n{MULTIPLE_CHOICE}",
                image_bytes=image_bytes,
                category=None if _tsv_missing(row.get("category")) else row["category"],
                answer_prompt=question,
                extra={
                    "options": options,
                    **{k: row[k] for k in ("answer", "l2-category", "split", "source") if not _tsv_missing(row.get(k))},
                },
            )

    def ground_truth(self, path: str | PathLike[str]) -> list[dict[str, Any]]:
        """Scorer ground truth from the TSV: {question_id: index, answer, options} per row. A row without an
        answer (the test split's answers are not public) or whose answer is not one of its options is an
        error naming the row."""
        out = []
        for line, row in enumerate(self._rows(path), start=2):
            index = self._index(row, path, line)
            answer = row.get("answer")
            if _tsv_missing(answer):
                raise EvalDataError(f"{path}: row {line} (index {index}) has no answer (a test split?)")
            options = self.options(row)
            if answer not in options:
                raise EvalDataError(
                    f"{path}: row {line} (index {index}): answer {answer!r} is not one of its options {sorted(options)}"
                )
            out.append({"question_id": index, "answer": answer, "options": options})
        return out


BenchmarkAdapter = JsonlQuestions | ScienceQAQuestions | MMBenchQuestions

BENCHMARKS: dict[str, BenchmarkAdapter] = {
    "vqav2": JsonlQuestions(name="vqav2", suffix=SHORT_ANSWER),
    "gqa": JsonlQuestions(name="gqa", suffix=SHORT_ANSWER),
    "textvqa": JsonlQuestions(name="textvqa", suffix=SHORT_ANSWER),
    "scienceqa": ScienceQAQuestions(),
    "pope": JsonlQuestions(name="pope", suffix=SHORT_ANSWER),
    "mme": JsonlQuestions(name="mme", suffix=SHORT_ANSWER),
    "mmbench": MMBenchQuestions(),
    "seed": JsonlQuestions(name="seed", suffix=MULTIPLE_CHOICE),
    "vizwiz": JsonlQuestions(name="vizwiz", suffix=f"{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"),
    "synthetic": JsonlQuestions(name="synthetic", suffix=None),
}


def get_benchmark(name: str) -> BenchmarkAdapter:
    """The adapter registered under `name`; `EvalDataError` naming the valid ones otherwise."""
    if name not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def answer_record(
    item: EvalItem,
    text: str,
    *,
    model_id: str,
    answer_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One line of LLaVA's answer jsonl: question_id, prompt, text, answer_id, model_id, metadata.
    `text` should be the decoded output stripped, as LLaVA writes it; `answer_id` defaults to a
    fresh random hex id (LLaVA uses shortuuid)."""
    return {
        "question_id": item.question_id,
        "prompt": item.record_prompt,
        "text": text,
        "answer_id": answer_id if answer_id is not None else uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": dict(metadata or {}),
    }


def write_answers(path: str | PathLike[str], records: Iterable[Mapping[str, Any]]) -> int:
    """Write answer records as jsonl, atomically (a temporary file renamed into place, so a reader
    never sees half a file). Creates the parent directory. Returns the number of records."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                n += 1
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return n
