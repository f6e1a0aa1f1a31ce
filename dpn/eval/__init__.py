"""Evaluation: benchmark adapters (`benchmarks`), official-equivalent scoring (`scoring`), the VQA
answer normalisation it rests on (`vqa_normalize`) and ground truth from the official annotation files
of the nine LLaVA-1.5 benchmarks (`convert`). Standard library only; nothing runs at import."""

from dpn.eval.benchmarks import (
    BENCHMARKS,
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    EvalItem,
    answer_record,
    get_benchmark,
    write_answers,
)
from dpn.eval.scoring import SCORERS, EvalDataError, load_jsonl, primary_metric, score, score_files

__all__ = [
    "BENCHMARKS",
    "MULTIPLE_CHOICE",
    "SCORERS",
    "SHORT_ANSWER",
    "VIZWIZ_UNANSWERABLE",
    "EvalDataError",
    "EvalItem",
    "answer_record",
    "get_benchmark",
    "load_jsonl",
    "primary_metric",
    "score",
    "score_files",
    "write_answers",
]
