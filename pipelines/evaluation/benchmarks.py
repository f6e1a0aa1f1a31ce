"""Where the benchmarks live on disk (LLaVA-1.5's `playground/data/eval` layout, or `dpn synth`'s
`DIR/eval`) and reading one: its questions (`dpn.eval.benchmarks` adapters) and the ground truth of
exactly those questions."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpn.eval.benchmarks import EvalItem, MMBenchQuestions, get_benchmark
from dpn.eval.scoring import EvalDataError, load_jsonl


# ----- benchmark files ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BenchmarkFiles:
    """Where a benchmark lives under `data_root` (LLaVA-1.5's eval layout)."""

    folder: str
    """Folder under data_root (LLaVA's `playground/data/eval/<folder>`)."""
    questions: str
    """LLaVA's question file in the folder. A `questions.jsonl` there takes precedence (own splits, e.g.
    VQAv2 val, whose ground truth is public unlike test-dev)."""
    images: str | None
    """Image folder inside `folder` (an `images/` folder takes precedence); None: images are inline."""
    ground_truth: str = "ground_truth.jsonl"
    """Ground truth in the schema of `dpn.eval.scoring`, one record per question."""


BENCHMARK_FILES: dict[str, BenchmarkFiles] = {
    "vqav2": BenchmarkFiles(folder="vqav2", questions="llava_vqav2_mscoco_test-dev2015.jsonl", images="test2015"),
    "gqa": BenchmarkFiles(folder="gqa", questions="llava_gqa_testdev_balanced.jsonl", images="data/images"),
    "textvqa": BenchmarkFiles(folder="textvqa", questions="llava_textvqa_val_v051_ocr.jsonl", images="train_images"),
    "scienceqa": BenchmarkFiles(folder="scienceqa", questions="llava_test_CQM-A.json", images="images/test"),
    "pope": BenchmarkFiles(folder="pope", questions="llava_pope_test.jsonl", images="val2014"),
    "mme": BenchmarkFiles(folder="MME", questions="llava_mme.jsonl", images="MME_Benchmark_release_version"),
    "mmbench": BenchmarkFiles(folder="mmbench", questions="mmbench_dev_20230712.tsv", images=None),
    "seed": BenchmarkFiles(folder="seed_bench", questions="llava-seed-bench.jsonl", images="."),
    "vizwiz": BenchmarkFiles(folder="vizwiz", questions="llava_test.jsonl", images="test"),
    "synthetic": BenchmarkFiles(folder="synthetic", questions="questions.jsonl", images="images"),
}


@dataclass(kw_only=True)
class BenchmarkData:
    """A benchmark's questions (after `limit`) and the ground truth of exactly those questions."""

    name: str
    question_file: Path
    items: list[EvalItem]
    ground_truth: list[dict[str, Any]]


def qid_key(qid: Any) -> tuple[str, Any]:
    # Ids are joined with their type (1 and "1" are different questions), as the scorer does.
    return (type(qid).__name__, qid)


@dataclass(frozen=True, kw_only=True)
class BenchmarkPaths:
    """Where one benchmark's files are under a data root (`locate_benchmark`)."""

    folder: Path
    question_file: Path
    image_root: Path | None
    ground_truth: Path | None
    """None: MMBench without a ground-truth file, read from its question TSV."""


def locate_benchmark(name: str, data_root: str | os.PathLike, ground_truth: bool = True) -> BenchmarkPaths:
    """The files of benchmark `name` under `data_root` (layout: `BENCHMARK_FILES`). Raises
    FileNotFoundError naming the benchmark and the missing folder, question file or (with `ground_truth`)
    ground truth: what the pipeline's preflight checks before any training starts."""
    files = BENCHMARK_FILES[name]
    folder = Path(data_root) / files.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark {name!r}: folder {folder} does not exist (data_root={data_root})")
    question_file = folder / "questions.jsonl"
    if not question_file.is_file():
        question_file = folder / files.questions
    if not question_file.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: neither {folder / 'questions.jsonl'} nor {question_file} exists")
    image_root = None
    if files.images is not None:
        image_root = folder / "images" if (folder / "images").is_dir() else folder / files.images
    gt_file: Path | None = folder / files.ground_truth
    if not gt_file.is_file():
        if ground_truth and not isinstance(get_benchmark(name), MMBenchQuestions):
            raise FileNotFoundError(
                f"benchmark {name!r}: no ground truth at {gt_file} (one JSON record per question, fields as in "
                "dpn.eval.scoring's table)")
        gt_file = None
    return BenchmarkPaths(folder=folder, question_file=question_file, image_root=image_root, ground_truth=gt_file)


def load_benchmark(name: str, data_root: str | os.PathLike, limit: int | None = None) -> BenchmarkData:
    """Read a benchmark's questions and ground truth from `data_root` (layout: `BENCHMARK_FILES`).

    Args:
        name: a benchmark of `dpn.eval.benchmarks.BENCHMARKS`.
        data_root: LLaVA's `playground/data/eval` (or `dpn synth`'s `DIR/eval`).
        limit: keep the first `limit` questions (None = all); the ground truth is cut to the same ids.
    Returns:
        BenchmarkData with `items` in file order.
    Raises:
        EvalDataError / FileNotFoundError naming the benchmark, file or question id.
    """
    adapter = get_benchmark(name)
    # The questions are checked first (their problems say how to fix the files), the ground truth after.
    paths = locate_benchmark(name, data_root, ground_truth=False)
    question_file = paths.question_file
    items = list(adapter.read(question_file, image_root=paths.image_root))
    # Answers are joined to ground truth by question_id; LLaVA's TextVQA and MME files repeat ids per image.
    repeated = [qid for qid, n in Counter(qid_key(it.question_id) for it in items).items() if n > 1]
    if repeated:
        hint = (f"; `dpn eval convert --benchmark {name} --questions {question_file.name}` writes a copy with one "
                "id per question" if name in ("textvqa", "mme") else "")
        raise EvalDataError(
            f"benchmark {name!r}: {len(repeated)} question_id(s) occur more than once in {question_file}, "
            f"e.g. {repeated[0][1]!r}; answers are matched to ground truth by question_id{hint}"
        )
    if limit is not None:
        items = items[:limit]
    if not items:
        raise EvalDataError(f"benchmark {name!r}: {question_file} holds no questions")

    if paths.ground_truth is None and not isinstance(adapter, MMBenchQuestions):
        locate_benchmark(name, data_root)  # raises, naming the missing ground truth
    gt_file = paths.ground_truth or question_file  # MMBench: the answers are columns of its TSV
    truth = load_jsonl(gt_file) if paths.ground_truth is not None else adapter.ground_truth(question_file)
    wanted = {qid_key(it.question_id) for it in items}
    by_id: dict[tuple[str, Any], dict[str, Any]] = {}
    for position, record in enumerate(truth, start=1):
        if "question_id" not in record:
            raise EvalDataError(f"{gt_file}: record {position} has no 'question_id'")
        by_id.setdefault(qid_key(record["question_id"]), record)
    missing = [it.question_id for it in items if qid_key(it.question_id) not in by_id]
    if missing:
        raise EvalDataError(
            f"benchmark {name!r}: {len(missing)} question(s) have no ground truth in {gt_file}, e.g. {missing[:5]}"
        )
    # Limited runs score exactly the questions asked; full runs keep every record, so a question the file
    # lacks (or a duplicate) surfaces as the scorer's error, never as a silently smaller benchmark.
    if limit is not None:
        truth = [r for r in truth if qid_key(r["question_id"]) in wanted]
    return BenchmarkData(name=name, question_file=question_file, items=items, ground_truth=truth)
