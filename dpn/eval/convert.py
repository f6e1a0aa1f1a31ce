"""Scorer ground truth (and, where LLaVA's question ids do not fit or its questions have no public answers,
question files) from the official annotation files of the nine benchmarks of the LLaVA-1.5 suite.

The output is the `ground_truth.jsonl` that `dpn.eval.scoring` and `pipelines/evaluation/benchmarks.py` read, one
record per question, with the question id of LLaVA's question file in its JSON type:

| benchmark | official file | ground-truth record |
| --- | --- | --- |
| vqav2 | `v2_mscoco_val2014_annotations.json`: {"annotations": [{question_id, answers: [{answer, ...}] x10, ...}]} | {question_id: int, answers: [10 annotator strings, raw]} |
| gqa | `testdev_balanced_questions.json`: {"<qid>": {question, answer, imageId, ...}} | {question_id: str, answer} |
| textvqa | `TextVQA_0.5.1_val.json`: {"data": [{question_id, question, image_id, answers: [10], ...}]} | {question_id: int, answers: [10 strings]} |
| mme | `MME_Benchmark_release_version/` (a directory): `<subtask>/[questions_answers_YN/]<image stem>.txt`, one "question<TAB>Yes/No" line per question | {question_id: "<subtask>/<image>#<k>", image, category, answer} |
| vizwiz | `val.json`: [{image, question, answers: [{answer, answer_confidence}] x10, answer_type, answerable}] | {question_id: int (position in the file), answers: [10 raw strings], answer_type, answerable} |
| pope | `coco_pope_{adversarial,popular,random}.json` (one file or their directory), one {question_id, image, text, label} per line | {question_id: int (LLaVA's: split offset + POPE's id), answer: yes/no, category: split} |
| scienceqa | `problems.json`: {"<pid>": {question, choices: [2-5], answer: index, hint, image, ...}} + `pid_splits.json` or LLaVA's `llava_test_CQM-A.json` | {question_id: pid, answer: "A".."E", num_choices, has_image} |
| mmbench | the TSV (`mmbench_dev_20230712.tsv`): index, question, A..D[/E], answer, ... | {question_id: index, answer, options: {letter: text}} |
| seed | `SEED-Bench.json`: {questions: [{question_id, answer: A-D, choice_a..d, question_type_id, data_type, ...}], question_type: {name: id}} | {question_id: int or str (as LLaVA casts it), answer, question_type_id, category: type name, data_type} |

Answers are copied unprocessed: the scorers normalise them as the official tools do.

Question ids, and the question files that go with them (`questions`, written as `questions.jsonl`,
which `pipelines/evaluation/benchmarks.py` prefers over LLaVA's file in the same folder):

- GQA: LLaVA's `llava_gqa_testdev_balanced.jsonl` uses GQA's own (string) ids: no question file needed.
- VQAv2: LLaVA ships only test-dev questions, whose answers are not public (test-dev is scored by the
  EvalAI server, after LLaVA's `convert_vqav2_for_submission.py`). Local scores need the val2014 split:
  pass `v2_OpenEnded_mscoco_val2014_questions.json` as `questions` to get a LLaVA-format question file
  (question + "\\n" + SHORT_ANSWER, image `COCO_val2014_<12-digit id>.jpg`).
- TextVQA: LLaVA's `llava_textvqa_val_v051_ocr.jsonl` uses the *image* id as `question_id`, so questions
  on the same image share it (LLaVA's `eval_textvqa.py` joins on image id + question text). Pass that
  file as `questions` to get a copy keyed by TextVQA's question ids (the image id kept as `image_id`),
  matched the way LLaVA's script matches: image id and lower-cased question (the first line of `text`),
  in file order where an image has the same question twice.
- VizWiz: LLaVA ships only test questions (`llava_test.jsonl`, question_id = position in test.json), whose
  answers are not public (scored by the EvalAI server). Local scores need the val split: `val.json` gives a
  LLaVA-format question file (question_id = position in val.json; the question, the unanswerable line and
  the short-answer line, as LLaVA's file has them) and its ground truth. The loader looks for the val
  images in an `images/` folder beside it.
- POPE: LLaVA's `llava_pope_test.jsonl` holds the three COCO splits, adversarial, random, popular, with POPE's
  ids offset by 0, 10,000,000 and 20,000,000 (`POPE_ID_OFFSETS`); LLaVA's `eval_pope.py` pairs a split's
  answers with its annotation lines by position. Pass that file as `questions` to get its ground truth
  (paired by position per split, image and question checked); without it, the same file is written from
  the annotations.
- ScienceQA: the question ids are problem ids. `questions` = LLaVA's `llava_test_CQM-A.json` gives exactly
  its problems (its images must agree with problems.json); without it, `pid_splits.json` beside
  problems.json gives the test split. The answer index becomes a letter, `num_choices` the number of
  choices (2 to 5: a question with five choices has answer E).
- MMBench: the TSV is the question file; ids are its `index` column.
- SEED: LLaVA's `llava-seed-bench.jsonl` uses SEED-Bench.json's ids cast as its `convert_seed_for_submission.py`
  casts them (digits -> int, "v1738" stays a str). `questions` = that file keeps exactly its questions.
- MME: LLaVA's `llava_mme.jsonl` uses the image path as `question_id`, and MME asks two questions per
  image, so both share it (LLaVA's `convert_answer_to_mme.py` joins on subtask, image file and question
  text). Pass that file as `questions` (required for MME) to get a copy whose ids are
  `<LLaVA id>#<k>`, k = 0, 1 in file order per image, which the scorer joins on; LLaVA's converter
  still reads the subtask and the image file out of such an id. The ground truth is matched as LLaVA's
  converter matches it: the question text without the short-answer line, plus " Please answer yes or
  no." (tried with one space, then two, as some MME files have).

With `questions`, the ground truth holds exactly the questions of the question file, in its order;
without, every annotated question, in the annotation file's order. A question id that occurs twice is
kept once when both records agree and is an error when they do not.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

from dpn.eval.benchmarks import write_answers
from dpn.eval.converters import CONVERTERS, Conversion
from dpn.eval.scoring import EvalDataError

# The LLaVA-1.5 suite, in the order of its results table.
CONVERTIBLE: tuple[str, ...] = tuple(CONVERTERS)


def convert(
    benchmark: str,
    annotations: str | PathLike[str],
    *,
    questions: str | PathLike[str] | None = None,
) -> Conversion:
    """Ground truth (and a question file where one is needed) from a benchmark's official annotations.

    Args:
        benchmark: one of `CONVERTIBLE`.
        annotations: VQAv2 `v2_mscoco_<split>_annotations.json`, GQA `<split>_questions.json`
            (e.g. testdev_balanced), VizWiz `<split>.json` (val), ScienceQA `problems.json`, TextVQA
            `TextVQA_0.5.1_<split>.json`, POPE a `coco_pope_<split>.json` or the directory of them, MME the
            `MME_Benchmark_release_version` directory, MMBench its TSV, SEED `SEED-Bench.json`.
        questions: VQAv2: the official `v2_OpenEnded_mscoco_<split>_questions.json`; ScienceQA: LLaVA's
            `llava_test_CQM-A.json` (else pid_splits.json beside problems.json, test split); TextVQA: LLaVA's
            `llava_textvqa_val_v051_ocr.jsonl`; POPE: LLaVA's `llava_pope_test.jsonl` (else one is written);
            MME (required): LLaVA's `llava_mme.jsonl`; SEED: LLaVA's `llava-seed-bench.jsonl` (restricts the
            ground truth to its questions); not used for GQA, VizWiz, MMBench.
    Raises:
        EvalDataError naming the file and the record or value at fault (wrong schema, missing keys,
        a split without public answers, an answer outside the benchmark's answer space, a repeated question
        id with different answers, a question without ground truth). FileNotFoundError for a missing file.
    """
    if benchmark not in CONVERTIBLE:
        raise EvalDataError(f"no ground-truth converter for benchmark {benchmark!r}; valid: {', '.join(CONVERTIBLE)}")
    return CONVERTERS[benchmark](annotations, questions)


def convert_files(
    benchmark: str,
    annotations: str | PathLike[str],
    out: str | PathLike[str],
    *,
    questions: str | PathLike[str] | None = None,
    questions_out: str | PathLike[str] | None = None,
) -> dict[str, Any]:
    """`convert`, then write the ground truth to `out` (and the question file to `questions_out`,
    default `questions.jsonl` beside `out`), each atomically, only once everything converted.
    Returns a JSON-serialisable summary: benchmark, paths, record counts."""
    result = convert(benchmark, annotations, questions=questions)
    out = Path(out)
    written_questions = None
    if result.questions is not None:
        written_questions = Path(questions_out) if questions_out is not None else out.parent / "questions.jsonl"
        if written_questions.resolve() == out.resolve():
            raise EvalDataError(f"the question file and the ground truth would both be written to {out}")
        # write_answers writes any jsonl atomically (temporary file renamed into place).
        write_answers(written_questions, result.questions)
    write_answers(out, result.ground_truth)
    return {
        "benchmark": benchmark,
        "ground_truth": str(out),
        "records": len(result.ground_truth),
        "questions": None if written_questions is None else str(written_questions),
        "duplicates_merged": result.duplicates_merged,
        "unmatched_annotations": result.unmatched_annotations,
    }
