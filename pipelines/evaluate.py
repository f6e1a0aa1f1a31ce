"""Evaluation fan-out: benchmarks split into shards, shards run by Ray actors (one per GPU, or per CPU slot),
answers gathered, scored with `dpn.eval`, written in LLaVA's answer format and tracked in MLflow.

    targets (model dir x compressors) x benchmarks
        -> shards of `shard_size` questions, each with an inputs fingerprint
        -> shards whose file exists for that fingerprint are reused (resume), the others go to a pool of
           `ShardRunner` actors (`num_gpus=1` each when the cluster has GPUs, else `num_cpus`)
        -> a failed shard is retried (`max_attempts`), then reported: the run raises `EvalShardsFailed`
           naming it, and nothing is scored from a benchmark with a missing shard
        -> per (model, compressor, benchmark): predictions.jsonl (LLaVA answers) + metrics.json
        -> one MLflow child run per (model, compressor) under the evaluation run, two figures, a summary.

Data layout: `data_root` is LLaVA's `playground/data/eval` (or `dpn synth`'s `DIR/eval`): one folder per
benchmark (see `BENCHMARK_FILES`) holding the question file, the images and `ground_truth.jsonl` in the
schema `dpn.eval.scoring` documents (MMBench's ground truth is read from its TSV when that file is absent).

Output layout, under `out_dir`:
    <model>/<compressor>/<benchmark>/shards/<index>.<fingerprint>.jsonl   one per shard, written atomically
    <model>/<compressor>/<benchmark>/predictions.jsonl                    LLaVA answer jsonl, question order
    <model>/<compressor>/<benchmark>/metrics.json                         scores, FLOPs, routing shares
    figures/accuracy_vs_flops.png, figures/routing_by_difficulty.png
    summary.json                                                          what `run_evaluation` returns

Each answer record's `metadata` keeps the per-sample measurements: routing path, visual/text tokens per
decoder layer, prefill TFLOPs (FastV convention and exact, `dpn.flops`), category and difficulty.

Shards are processed in a fixed layout (`shard_size`, `batch_size`) that does not depend on the number of
workers, so any fan-out computes exactly the same batches and gives the same answers as one worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpn.compressors import COMPRESSORS, NOT_POOLED, format_path
from dpn.eval.benchmarks import (
    BENCHMARKS,
    EvalItem,
    MMBenchQuestions,
    answer_record,
    get_benchmark,
    write_answers,
)
from dpn.eval.scoring import EvalDataError, load_jsonl, primary_metric, score

# Compressors a checkpoint can be evaluated with.
EVAL_COMPRESSORS = COMPRESSORS
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "gpu", "cpu")
_DIFFICULTY_ORDER = ("easy", "medium", "hard")  # the synthetic benchmark's; others sort after, by name
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


class EvalShardsFailed(RuntimeError):
    """Some shards still failed after `max_attempts`; `summary` holds what did finish and the failures."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class InjectedShardFailure(RuntimeError):
    """Raised by `ShardRunner` for shards listed in `EvalConfig.inject_failures` (the testing seam)."""


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


def _qid_key(qid: Any) -> tuple[str, Any]:
    # Ids are joined with their type (1 and "1" are different questions), as the scorer does.
    return (type(qid).__name__, qid)


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
    items = list(adapter.read(question_file, image_root=image_root))
    # Answers are joined to ground truth by question_id; LLaVA's TextVQA and MME files repeat ids per image.
    repeated = [qid for qid, n in Counter(_qid_key(it.question_id) for it in items).items() if n > 1]
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

    gt_file = folder / files.ground_truth
    if gt_file.is_file():
        truth = load_jsonl(gt_file)
    elif isinstance(adapter, MMBenchQuestions):
        truth = adapter.ground_truth(question_file)
    else:
        raise FileNotFoundError(
            f"benchmark {name!r}: no ground truth at {gt_file} (one JSON record per question, fields as in "
            "dpn.eval.scoring's table)"
        )
    wanted = {_qid_key(it.question_id) for it in items}
    by_id: dict[tuple[str, Any], dict[str, Any]] = {}
    for position, record in enumerate(truth, start=1):
        if "question_id" not in record:
            raise EvalDataError(f"{gt_file}: record {position} has no 'question_id'")
        by_id.setdefault(_qid_key(record["question_id"]), record)
    missing = [it.question_id for it in items if _qid_key(it.question_id) not in by_id]
    if missing:
        raise EvalDataError(
            f"benchmark {name!r}: {len(missing)} question(s) have no ground truth in {gt_file}, e.g. {missing[:5]}"
        )
    # Limited runs score exactly the questions asked; full runs keep every record, so a question the file
    # lacks (or a duplicate) surfaces as the scorer's error, never as a silently smaller benchmark.
    if limit is not None:
        truth = [r for r in truth if _qid_key(r["question_id"]) in wanted]
    return BenchmarkData(name=name, question_file=question_file, items=items, ground_truth=truth)


# ----- configuration -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EvalTarget:
    """One model checkpoint and the compressors to evaluate it with."""

    name: str
    """Display name: output folder, MLflow run name, answer files' `model_id` ([A-Za-z0-9._-])."""
    model_dir: str
    """`save_pretrained` directory of a `DPNForConditionalGeneration`."""
    compressors: list[str] | None = None
    """Compressors to run the checkpoint with (`config.compressor` is overridden at load); None = the one
    it was saved with. `dpn` needs router weights in the checkpoint."""
    tokenizer_dir: str | None = None
    """Tokenizer directory; None = `model_dir` when it holds tokenizer files, else `model_dir/tokenizer`."""
    budget: float | None = None
    """Compressor dpn: target mean LLM prefill FLOPs as a fraction of the uncompressed model, reached by
    the checkpoint's calibrated budget curve (`dpn.routing`); None = the budget it was saved with."""

    def __post_init__(self) -> None:
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int | float)
                                        or not math.isfinite(self.budget) or not 0 < self.budget <= 1):
            raise ValueError(f"target {self.name!r}: budget must be a fraction in (0, 1], got {self.budget!r}")
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise ValueError(f"target name must match {_SAFE_NAME.pattern} (it names folders), got {self.name!r}")
        if self.compressors is not None:
            self.compressors = list(self.compressors)
            if not self.compressors:
                raise ValueError(f"target {self.name!r}: compressors must be None or non-empty")
            bad = [c for c in self.compressors if c not in EVAL_COMPRESSORS]
            if bad:
                raise ValueError(f"target {self.name!r}: unknown compressor(s) {bad}; valid: {EVAL_COMPRESSORS}")
            if len(set(self.compressors)) != len(self.compressors):
                raise ValueError(f"target {self.name!r}: compressors must be distinct, got {self.compressors}")


@dataclass(kw_only=True)
class EvalConfig:
    """An evaluation: targets x compressors x benchmarks."""

    targets: list[EvalTarget]
    """Models to evaluate (distinct names)."""
    benchmarks: list[str]
    """Benchmark names of `dpn.eval.benchmarks.BENCHMARKS`."""
    data_root: str
    """LLaVA's `playground/data/eval` (or `dpn synth`'s `DIR/eval`); layout in `BENCHMARK_FILES`."""
    out_dir: str
    """Where shards, predictions, metrics, figures and summary.json go (shards survive for resume)."""
    limit: int | None = None
    """Evaluate only the first N questions of each benchmark (None = all)."""
    template: str = "vicuna_v1"
    """Conversation template of the prompts (LLaVA-1.5's eval scripts use vicuna_v1)."""
    batch_size: int = 8
    """Prompts per generate call (left padded, greedy)."""
    shard_size: int = 128
    """Questions per shard (the unit of scheduling, retry and resume)."""
    max_new_tokens: int = 16
    """Generation cap: every supported benchmark asks for a word, a number, yes/no or a letter."""
    dtype: str = "auto"
    """Model dtype: "auto" = bfloat16 on GPU, float32 on CPU."""
    device: str = "auto"
    """"auto": one GPU per worker when the Ray cluster has GPUs, else CPU workers; "gpu" / "cpu" force it."""
    num_workers: int | None = None
    """Actors to start; None = one per GPU, or cluster CPUs // cpus_per_worker on CPU (capped by the shards)."""
    cpus_per_worker: float = 1.0
    """`num_cpus` of each actor (and its torch threads on CPU)."""
    max_attempts: int = 3
    """Attempts per shard (application errors and worker deaths alike) before it is reported failed."""
    inject_failures: dict[str, int] = field(default_factory=dict)
    """TESTING SEAM, empty in real runs: {shard key: n} makes the first n attempts of that shard raise
    `InjectedShardFailure` inside the worker before any model work. Keys are
    "<model>/<compressor>/<benchmark>/<index>" as `plan_shards` and the summary list them."""

    def __post_init__(self) -> None:
        self.targets = [EvalTarget(**t) if isinstance(t, Mapping) else t for t in self.targets]
        if not self.targets:
            raise ValueError("targets must name at least one model")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be distinct, got {names}")
        self.benchmarks = list(self.benchmarks)
        if not self.benchmarks:
            raise ValueError("benchmarks must name at least one benchmark")
        bad = [b for b in self.benchmarks if b not in BENCHMARKS]
        if bad:
            raise ValueError(f"unknown benchmark(s) {bad}; valid: {sorted(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks must be distinct, got {self.benchmarks}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"limit must be >= 1 or None, got {self.limit!r}")
        for name in ("batch_size", "shard_size", "max_new_tokens", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or self.num_workers < 1):
            raise ValueError(f"num_workers must be >= 1 or None, got {self.num_workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for key, n in self.inject_failures.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"inject_failures[{key!r}] must be an int >= 0, got {n!r}")


@dataclass(kw_only=True)
class TrackingOptions:
    """Where `run_evaluation` logs (see `pipelines.tracking`)."""

    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else SQLite under `work_dir`."""
    work_dir: str | None = None
    """Root of the default SQLite store and artifact location."""
    experiment: str = "dpn"
    parent_run_id: str | None = None
    """The evaluation run to nest the child runs under (e.g. the DAG step's run); None: a new run
    named `run_name` is created (and finished) here."""
    run_name: str = "evaluate"


# ----- checkpoints -------------------------------------------------------------------------------------
# sha256 of files already hashed by this process, keyed by (path, size, mtime_ns, ctime_ns, inode).
_CONTENT_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # streamed: weight files are gigabytes


def _file_identity(path: Path) -> str:
    # By content, so that a copied checkpoint keeps its finished shards and a rewritten one never reuses
    # them, whatever its size and mtime (mtime can be set back, and has coarse ticks on some filesystems).
    # sha256 runs at about 1 GB/s on one core (13 s plus the reads for a 7B fp16 checkpoint), so each file
    # is hashed once per process. The cache key adds ctime and inode to size and mtime: a write in place
    # always moves ctime (which, unlike mtime, cannot be set), and a file replaced by rename has a new inode.
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _CONTENT_HASHES:
        digest = _sha256_file(path)
        after = path.stat()
        # Cache only a hash of a file that did not change while it was read.
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) != key[1:]:
            return digest
        _CONTENT_HASHES[key] = digest
    return _CONTENT_HASHES[key]


def _dir_identity(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _file_identity(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    }


def resolve_tokenizer_dir(target: EvalTarget) -> Path:
    """`target.tokenizer_dir`, else the model directory when it holds tokenizer files, else `model_dir/tokenizer`."""
    if target.tokenizer_dir is not None:
        path = Path(target.tokenizer_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"target {target.name!r}: tokenizer_dir {path} is not a directory")
        return path
    model_dir = Path(target.model_dir)
    for candidate in (model_dir, model_dir / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"target {target.name!r}: no tokenizer in {model_dir} or {model_dir / 'tokenizer'}; pass tokenizer_dir"
    )


def _checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Weight names of a safetensors checkpoint (headers only), or None when it is not one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return None


def check_checkpoint(model_dir: str | os.PathLike, compressor: str, budget: float | None = None) -> dict[str, Any]:
    """Validate that `model_dir` can run with `compressor` (and `budget`) without loading the weights;
    returns its config.json. A `dpn` evaluation of a checkpoint without router weights (trained as "none"
    or "static") would silently route with random routers, so it is an error here, as is a budget the
    checkpoint's calibrated curve does not reach (the message names the reachable range)."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir}: not a save_pretrained directory (no config.json)")
    config = json.loads(config_file.read_text())
    if compressor not in EVAL_COMPRESSORS:
        raise ValueError(f"compressor must be one of {EVAL_COMPRESSORS}, got {compressor!r}")
    if compressor == "dpn":
        keys = _checkpoint_keys(model_dir)
        if keys is not None and not any(k.startswith("routers.") for k in keys):
            raise ValueError(
                f"{model_dir} has no router weights (saved with compressor={config.get('compressor')!r}); "
                "the dpn compressor needs a checkpoint trained with routers. Evaluate it with "
                "static / none / fastv / pdrop instead."
            )
        if config.get("router_token_id") is None:
            raise ValueError(
                f"{model_dir}/config.json has no router_token_id: the <ROUTER> token appended to dpn prompts "
                "would not be where the router reads; set it to the tokenizer's <ROUTER> id"
            )
    if budget is not None:
        if compressor != "dpn":
            raise ValueError(f"a budget steers dpn routers; compressor {compressor!r} has none")
        curve = config.get("budget_curve")
        if not curve:
            raise ValueError(f"{model_dir} has no budget_curve: calibrate it first (the pipeline's route_calibrate "
                             "step, or dpn.routing.budget_curve)")
        lo, hi = min(curve["flops_fraction"]), max(curve["flops_fraction"])
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            raise ValueError(f"budget {budget:g} is outside what {model_dir}'s routing paths reach on its calibration "
                             f"data: [{lo:.3f}, {hi:.3f}] of the uncompressed model's prefill FLOPs")
    return config


def load_model(model_dir: str | os.PathLike, compressor: str, dtype: str = "float32", device: str = "cpu",
               budget: float | None = None, **config_overrides: Any):
    """`DPNForConditionalGeneration.from_pretrained(model_dir, compressor=compressor)` in eval mode, with
    the dpn routers steered to `budget` when given (else the checkpoint's own) and further config fields
    overridden (e.g. `random_path_shares` for compressor "random").

    Raises ValueError when the checkpoint lacks weights the compressor needs (e.g. routers for `dpn`),
    instead of transformers' default of initialising them randomly with a warning.
    """
    import torch

    from dpn.modeling_dpn import DPNForConditionalGeneration

    if budget is not None:
        config_overrides["budget"] = budget
    model, info = DPNForConditionalGeneration.from_pretrained(
        str(model_dir), compressor=compressor, dtype=getattr(torch, dtype), output_loading_info=True,
        **config_overrides,
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        hint = (
            " (no router weights: the checkpoint was not trained with compressor='dpn')"
            if any(k.startswith("routers.") for k in missing)
            else ""
        )
        raise ValueError(
            f"{model_dir}: loading with compressor={compressor!r} leaves {len(missing)} weight(s) uninitialised"
            f"{hint}, e.g. {missing[:4]}"
        )
    return model.to(device).eval()


# ----- one shard, in one process -----------------------------------------------------------------------
def path_label(experts: Sequence[int], factors: Sequence[int]) -> str:
    """Routing path as compression factors per DPE, e.g. [2, 1, 0] with factors [1, 2, 4] -> "4-2-1";
    a DPE that did not pool the sample (-1) shows as "n"."""
    return format_path([None if int(j) < 0 else factors[int(j)] for j in experts])


def predict(
    model,
    tokenizer,
    image_processor,
    items: Sequence[EvalItem],
    *,
    compressor: str,
    benchmark: str,
    model_id: str,
    template: str = "vicuna_v1",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    answer_salt: str = "",
    path: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Answer `items` with greedy batched generation; returns LLaVA answer records in item order.

    Prompts are LLaVA-1.5's (`dpn.conversation.build_prompt`) with `<ROUTER>` appended for the dpn
    compressor, left padded. `metadata` of each record holds the per-sample measurements (routing path,
    tokens per layer, prefill TFLOPs, category, difficulty). `answer_id` is derived from `answer_salt`
    and the question id, so a re-run writes identical files. `path` (compression factor per DPE, e.g.
    [4, 2, 1]) sends every sample down that path instead of its router's choice (the fixed paths of a
    dpn model's own weights).
    """
    import torch

    from dpn.collate import collate
    from dpn.conversation import encode_prompt
    from dpn.flops import flops_report
    from dpn.image_processing import preprocess_images

    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    factors = config.expert_factors
    add_router = compressor == "dpn"
    forced = None if path is None else torch.tensor([config.expert_index(int(f)) for f in path])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; left padding needs one (dpn.tokenizer.ensure_special_tokens)")
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        samples = []
        for item in batch:
            try:
                ids = encode_prompt(item.text, tokenizer, template, config.num_image_tokens, item.has_image, add_router)
                pixels = preprocess_images([item.open_image()], image_processor)[0] if item.has_image else None
            except (OSError, ValueError) as e:
                raise EvalDataError(f"{benchmark} question {item.question_id!r}: {e}") from e
            samples.append({"input_ids": ids, "labels": ids, "pixel_values": pixels})
        inputs = collate(samples, pad_token_id=pad, padding_side="left", image_token_id=config.image_token_id)
        pixel_values = inputs.get("pixel_values")
        out = model.generate(
            inputs["input_ids"].to(device),
            pixel_values=None if pixel_values is None else pixel_values.to(device=device, dtype=dtype),
            attention_mask=inputs["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            return_dict_in_generate=True,
            force_path=None if forced is None else forced.expand(len(batch), -1).to(device),
        )
        sequences = out.new_tokens.cpu()
        n_new = out.num_new_tokens.cpu().tolist()
        paths = out.routing_paths.cpu().tolist()
        vis = out.visual_tokens_per_layer.cpu().tolist()
        txt = out.text_tokens_per_layer.cpu().tolist()
        for b, item in enumerate(batch):
            tokens = sequences[b, : n_new[b]].tolist()
            if tokens and eos is not None and tokens[-1] == eos:
                tokens = tokens[:-1]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            report = flops_report(config, vis[b], txt[b])
            difficulty = item.extra.get("difficulty")
            metadata = {
                "benchmark": benchmark,
                "compressor": compressor,
                "category": item.category,
                "difficulty": difficulty if isinstance(difficulty, str) else None,
                "routing_experts": paths[b],
                "routing_path": path_label(paths[b], factors),
                "visual_tokens_per_layer": vis[b],
                "text_tokens_per_layer": txt[b],
                "prefill_tflops": report["tflops"],
                "prefill_tflops_exact": report["tflops_exact"],
                "baseline_prefill_tflops": report["baseline_tflops"],
                "vision_tflops": report["vision_tflops"],
                "num_new_tokens": n_new[b],
            }
            answer_id = hashlib.sha1(f"{answer_salt}:{item.question_id!r}".encode()).hexdigest()[:22]
            records.append(answer_record(item, text, model_id=model_id, answer_id=answer_id, metadata=metadata))
    return records


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """One shard: a slice of one benchmark, for one (model, compressor)."""

    key: str
    target: str
    compressor: str
    benchmark: str
    index: int
    items: tuple[EvalItem, ...]
    fingerprint: str
    path: str


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What every `ShardRunner` needs besides the shard itself (plain data, shipped once per actor)."""

    models: dict[str, tuple[str, str, float | None]]  # target name -> (model_dir, tokenizer_dir, budget)
    template: str
    batch_size: int
    max_new_tokens: int
    dtype: str  # resolved: float32 / bfloat16 / float16
    threads: int
    inject_failures: dict[str, int]
    use_gpu: bool  # decided by the driver from the cluster's resources and `EvalConfig.device`


class ShardRunner:
    """Runs shards in one process: a Ray actor per GPU (or CPU slot), or called directly.

    Keeps the last (model, compressor) loaded, so consecutive shards of the same pair load it once.
    """

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._key: tuple[str, str] | None = None
        self._loaded: tuple[Any, Any, Any] | None = None

    def _model(self, target: str, compressor: str):
        if self._key == (target, compressor):
            return self._loaded
        import torch

        from dpn.image_processing import build_image_processor
        from dpn.tokenizer import load_tokenizer

        self._loaded = self._key = None
        model_dir, tokenizer_dir, budget = self.settings.models[target]
        cuda = self.settings.use_gpu
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("this worker was given a GPU by Ray but torch sees no CUDA device")
        if not cuda:
            torch.set_num_threads(self.settings.threads)
        model = load_model(model_dir, compressor, dtype=self.settings.dtype, device="cuda" if cuda else "cpu",
                           budget=budget if compressor == "dpn" else None)
        tokenizer = load_tokenizer(tokenizer_dir)
        if compressor == "dpn":
            from dpn.constants import ROUTER_TOKEN

            router_id = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
            if router_id != model.config.router_token_id:
                raise ValueError(
                    f"{model_dir}: router_token_id {model.config.router_token_id} differs from the tokenizer's "
                    f"{ROUTER_TOKEN} id {router_id} ({tokenizer_dir})"
                )
        processor = build_image_processor(model.config.vision_config.image_size)
        self._key, self._loaded = (target, compressor), (model, tokenizer, processor)
        return self._loaded

    def run(self, task: ShardTask, attempt: int) -> dict[str, Any]:
        """Answer one shard. `attempt` counts from 1; see `EvalConfig.inject_failures` for the test seam."""
        if attempt <= self.settings.inject_failures.get(task.key, 0):
            raise InjectedShardFailure(f"injected failure of shard {task.key} (attempt {attempt})")
        t0 = time.perf_counter()
        model, tokenizer, processor = self._model(task.target, task.compressor)
        records = predict(
            model, tokenizer, processor, task.items,
            compressor=task.compressor, benchmark=task.benchmark, model_id=task.target,
            template=self.settings.template, batch_size=self.settings.batch_size,
            max_new_tokens=self.settings.max_new_tokens, answer_salt=task.fingerprint,
        )
        return {"records": records, "seconds": time.perf_counter() - t0}


# ----- planning ----------------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def _items_digest(items: Sequence[EvalItem]) -> str:
    return _digest([
        [repr(it.question_id), it.text, it.image, hashlib.sha256(it.image_bytes).hexdigest() if it.image_bytes else None]
        for it in items
    ])


def _code_version() -> str:
    from pipelines.dag import code_version

    return code_version(("dpn",))


def plan_shards(
    config: EvalConfig,
    data: Mapping[str, BenchmarkData],
    compressors: Mapping[str, list[str]],
    code: str,
    dtype: str,
) -> list[ShardTask]:
    """Every shard of the evaluation, compressor-major (so actors reload models rarely), with the
    fingerprint of its inputs: model and tokenizer files, compressor, questions, generation settings, the
    resolved `dtype` (bf16 GPU answers are not reused for an fp32 CPU run) and the `dpn` code version."""
    out_root = Path(config.out_dir)
    tasks = []
    for target in config.targets:
        model_id = _dir_identity(Path(target.model_dir))
        tok_id = _dir_identity(resolve_tokenizer_dir(target))
        for compressor in compressors[target.name]:
            for bench in config.benchmarks:
                items = data[bench].items
                for index, start in enumerate(range(0, len(items), config.shard_size)):
                    chunk = tuple(items[start : start + config.shard_size])
                    fp = _digest({
                        "model": model_id, "tokenizer": tok_id, "compressor": compressor, "benchmark": bench,
                        "items": _items_digest(chunk), "template": config.template, "batch_size": config.batch_size,
                        "max_new_tokens": config.max_new_tokens, "dtype": dtype, "code": code,
                        "budget": target.budget if compressor == "dpn" else None,
                    })[:16]
                    folder = out_root / target.name / compressor / bench / "shards"
                    tasks.append(ShardTask(
                        key=f"{target.name}/{compressor}/{bench}/{index}", target=target.name,
                        compressor=compressor, benchmark=bench, index=index, items=chunk, fingerprint=fp,
                        path=str(folder / f"{index:05d}.{fp}.jsonl"),
                    ))
    return tasks


def _write_shard(task: ShardTask, records: list[dict[str, Any]]) -> None:
    path = Path(task.path)
    write_answers(path, records)
    # Outputs of the same shard for other inputs are stale now.
    for old in path.parent.glob(f"{task.index:05d}.*.jsonl"):
        if old != path:
            old.unlink(missing_ok=True)


# ----- fan-out -----------------------------------------------------------------------------------------
def _placement(config: EvalConfig) -> tuple[bool, int]:
    """(use GPUs, number of workers) for the Ray cluster we are connected to (a local one is started if
    none is): one worker per GPU, else cluster CPUs // cpus_per_worker, unless `num_workers` is set."""
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device == "gpu" and gpus == 0:
        raise RuntimeError("device='gpu' but the Ray cluster has no GPU")
    use_gpu = config.device == "gpu" or (config.device == "auto" and gpus > 0)
    if config.num_workers is not None:
        return use_gpu, config.num_workers
    if use_gpu:
        return use_gpu, gpus
    return use_gpu, max(1, int(resources.get("CPU", 1) // config.cpus_per_worker))


def _run_shards(
    tasks: list[ShardTask], settings: WorkerSettings, config: EvalConfig, n_workers: int, log: Callable[[str], None]
) -> tuple[dict[str, int], dict[str, str], float]:
    """Run `tasks` on a pool of `n_workers` Ray actors (one GPU each when `settings.use_gpu`). Returns
    ({key: attempts} of finished shards, {key: error} of shards that failed `max_attempts` times, wall
    seconds of the fan-out including worker start-up)."""
    import ray
    from ray.exceptions import RayActorError

    n_workers = max(1, min(n_workers, len(tasks)))
    actor_cls = ray.remote(ShardRunner).options(
        num_cpus=config.cpus_per_worker, num_gpus=1 if settings.use_gpu else 0, max_restarts=0, max_task_retries=0
    )
    log(f"evaluate: {len(tasks)} shard(s) on {n_workers} {'GPU' if settings.use_gpu else 'CPU'} worker(s)")

    actors = [actor_cls.remote(settings) for _ in range(n_workers)]
    loaded: dict[Any, tuple[str, str] | None] = {a: None for a in actors}
    queue: deque[tuple[ShardTask, int]] = deque((t, 1) for t in tasks)
    running: dict[Any, tuple[Any, ShardTask, int]] = {}
    idle = list(actors)
    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                # Prefer a shard of the model this actor already holds.
                pick = next((i for i, (t, _) in enumerate(queue) if (t.target, t.compressor) == loaded[actor]), 0)
                task, attempt = queue[pick]
                del queue[pick]
                loaded[actor] = (task.target, task.compressor)
                running[actor.run.remote(task, attempt)] = (actor, task, attempt)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                actor, task, attempt = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # an application error in the shard, or the worker died
                    error = f"{type(e).__name__}: {_first_line(e)}"
                    if isinstance(e, RayActorError):
                        # The process is gone: replace it so the pool keeps its size.
                        loaded.pop(actor, None)
                        actor = actor_cls.remote(settings)
                        actors.append(actor)
                        loaded[actor] = None
                    idle.append(actor)
                    if attempt < config.max_attempts:
                        log(f"evaluate: shard {task.key} attempt {attempt} failed ({error}); retrying")
                        queue.appendleft((task, attempt + 1))
                    else:
                        log(f"evaluate: shard {task.key} failed after {attempt} attempt(s): {error}")
                        failed[task.key] = error
                    continue
                _write_shard(task, result["records"])
                done[task.key] = attempt
                idle.append(actor)
                log(f"evaluate: shard {task.key} done ({len(result['records'])} answers, {result['seconds']:.1f}s)")
    finally:
        for actor in actors:
            ray.kill(actor)
    return done, failed, time.perf_counter() - t0


def _first_line(e: BaseException) -> str:
    # RayTaskError messages carry the remote traceback; the cause's own message is the useful part.
    cause = getattr(e, "cause", None)
    text = str(cause if cause is not None else e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


# ----- aggregation -------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _difficulty_key(name: str) -> tuple[int, str]:
    return (_DIFFICULTY_ORDER.index(name), "") if name in _DIFFICULTY_ORDER else (len(_DIFFICULTY_ORDER), name)


def _shares(labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {k: 100.0 * n / len(labels) for k, n in sorted(counts.items())}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """FLOPs means and routing-path shares (percent) of one benchmark's answer records."""
    meta = [r["metadata"] for r in records]
    by_difficulty: dict[str, list[str]] = defaultdict(list)
    tflops_by_difficulty: dict[str, list[float]] = defaultdict(list)
    for m in meta:
        if m.get("difficulty") is not None:
            by_difficulty[m["difficulty"]].append(m["routing_path"])
            tflops_by_difficulty[m["difficulty"]].append(m["prefill_tflops"])
    return {
        "num_samples": len(meta),
        "prefill_tflops_per_sample": _mean([m["prefill_tflops"] for m in meta]),
        "prefill_tflops_exact_per_sample": _mean([m["prefill_tflops_exact"] for m in meta]),
        "baseline_prefill_tflops_per_sample": _mean([m["baseline_prefill_tflops"] for m in meta]),
        "vision_tflops_per_sample": _mean([m["vision_tflops"] for m in meta]),
        "path_shares": _shares([m["routing_path"] for m in meta]),
        "path_shares_by_difficulty": {
            d: _shares(by_difficulty[d]) for d in sorted(by_difficulty, key=_difficulty_key)
        },
        "prefill_tflops_by_difficulty": {
            d: _mean(tflops_by_difficulty[d]) for d in sorted(tflops_by_difficulty, key=_difficulty_key)
        },
    }


def _saving_pct(ours: float | None, base: float | None) -> float | None:
    if ours is None or not base:
        return None
    return 100.0 * (1.0 - ours / base)


def _row(target: str, compressor: str, per_bench: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary row of one (model, compressor): per-benchmark results plus sample-weighted means."""
    n = sum(b["num_samples"] for b in per_bench.values())

    def weighted(key: str) -> float | None:
        if not n or any(b[key] is None for b in per_bench.values()):
            return None
        return sum(b[key] * b["num_samples"] for b in per_bench.values()) / n

    tflops = weighted("prefill_tflops_per_sample")
    base = weighted("baseline_prefill_tflops_per_sample")
    return {
        "model": target,
        "compressor": compressor,
        "num_samples": n,
        "accuracy": {k: b["primary"] for k, b in per_bench.items()},
        "accuracy_by_difficulty": {
            k: b["metrics"]["per_difficulty"] for k, b in per_bench.items() if "per_difficulty" in b["metrics"]
        },
        "metrics": {k: b["metrics"] for k, b in per_bench.items()},
        "prefill_tflops_per_sample": tflops,
        "prefill_tflops_exact_per_sample": weighted("prefill_tflops_exact_per_sample"),
        "baseline_prefill_tflops_per_sample": base,
        "vision_tflops_per_sample": weighted("vision_tflops_per_sample"),
        "prefill_tflops_by_benchmark": {k: b["prefill_tflops_per_sample"] for k, b in per_bench.items()},
        "saving_vs_uncompressed_pct": _saving_pct(tflops, base),
        "saving_vs_none_pct": None,
        "path_shares": {k: b["path_shares"] for k, b in per_bench.items()},
        "path_shares_by_difficulty": {
            k: b["path_shares_by_difficulty"] for k, b in per_bench.items() if b["path_shares_by_difficulty"]
        },
        "prefill_tflops_by_difficulty": {
            k: b["prefill_tflops_by_difficulty"] for k, b in per_bench.items() if b.get("prefill_tflops_by_difficulty")
        },
        "predictions": {k: b["predictions"] for k, b in per_bench.items()},
        "mlflow_run_id": None,
    }


def _fill_saving_vs_none(rows: list[dict[str, Any]]) -> None:
    # Baseline: the same model run with compressor "none", else the first "none" row (in the pipeline each
    # variant is its own model; the none-trained one is the LLaVA-1.5 baseline). Same questions either way.
    nones = [r for r in rows if r["compressor"] == "none"]
    for row in rows:
        same = [r for r in nones if r["model"] == row["model"]]
        base = (same or nones or [None])[0]
        if base is not None:
            row["saving_vs_none_pct"] = _saving_pct(row["prefill_tflops_per_sample"], base["prefill_tflops_per_sample"])


def format_table(summary: Mapping[str, Any]) -> str:
    """The results table the demo prints: one line per (model, compressor)."""
    benches = list(summary["benchmarks"])
    difficulties = sorted(
        {d for r in summary["rows"] for acc in r["accuracy_by_difficulty"].values() for d in acc}, key=_difficulty_key
    )
    head = ["model", "compressor", *benches, *[f"acc/{d}" for d in difficulties], "TFLOPs/sample",
            "saving vs none", "top path"]
    lines = [head]
    for r in summary["rows"]:
        by_diff: dict[str, float] = {}
        for acc in r["accuracy_by_difficulty"].values():  # the synthetic benchmark's
            by_diff.update(acc)
        shares = Counter()
        for s in r["path_shares"].values():
            shares.update(s)
        top = max(shares.items(), key=lambda kv: kv[1])[0] if shares else "-"
        lines.append([
            r["model"], r["compressor"],
            *[_fmt(r["accuracy"].get(b)) for b in benches],
            *[_fmt(by_diff.get(d)) for d in difficulties],
            "-" if r["prefill_tflops_per_sample"] is None else f"{r['prefill_tflops_per_sample']:.4g}",
            "-" if r["saving_vs_none_pct"] is None else f"{r['saving_vs_none_pct']:.1f}%",
            top,
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def format_category_table(summary: Mapping[str, Any], chance_pct: Mapping[str, float], benchmark: str = "synthetic",
                          difficulties: Sequence[str] = ()) -> str:
    """Accuracy per question type of `benchmark` (its scorer's `per_category`), one line per model, under a
    line of each type's chance level: which skills a model has learned, which it only guesses. With
    `difficulties`, each model's line is followed by one line per difficulty (the scorer's
    `per_category_difficulty`): whether a skill holds beyond the easy, one-object scenes."""
    categories = list(chance_pct)
    lines = [["per question type", *categories], ["chance", *[_fmt(chance_pct[c]) for c in categories]]]
    for r in summary["rows"]:
        metrics = r.get("metrics", {}).get(benchmark, {})
        per = metrics.get("per_category")
        if per is not None:
            lines.append([f"{r['model']}/{r['compressor']}", *[_fmt(per.get(c)) for c in categories]])
            cells = metrics.get("per_category_difficulty", {})
            for d in difficulties:
                lines.append([f"  {d}", *[_fmt(cells.get(f"{c}/{d}")) for c in categories]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ----- figures -----------------------------------------------------------------------------------------
def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (fewer FLOPs and higher accuracy), by FLOPs."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_accuracy_vs_flops(summary: Mapping[str, Any], path: Path) -> Path:
    """One panel per benchmark: primary metric vs prefill TFLOPs/sample, one point per (model, compressor),
    the Pareto front drawn through the non-dominated points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches = list(summary["benchmarks"])
    fig = Figure(figsize=(4.5 * len(benches), 3.8))
    FigureCanvasAgg(fig)
    for i, bench in enumerate(benches):
        ax = fig.add_subplot(1, len(benches), i + 1)
        points = []
        for r in summary["rows"]:
            x, y = r["prefill_tflops_by_benchmark"].get(bench), r["accuracy"].get(bench)
            if x is None or y is None:
                continue
            points.append((x, y))
            ax.scatter([x], [y], s=40)
            ax.annotate(f"{r['model']}/{r['compressor']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = _pareto_front(points)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="gray", linewidth=1)
        ax.set_xlabel("LLM prefill TFLOPs / sample")
        ax.set_ylabel(f"{bench} (primary metric)")
        ax.set_title(bench)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _pools(row: Mapping[str, Any]) -> bool:
    """Whether any sample of the row was pooled at some DPE (not so for `none`, `fastv`, `pdrop`)."""
    return any(
        part != NOT_POOLED for shares in row["path_shares"].values() for label in shares for part in label.split("-")
    )


def plot_routing_by_difficulty(summary: Mapping[str, Any], path: Path) -> Path:
    """Stacked bars: share of samples per routing path, by difficulty (in the order of the synthetic
    benchmark's levels), one panel per (model, compressor) that pools at all; benchmarks without a
    difficulty field (all but the synthetic one) are pooled into one "all" bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in summary["rows"] if _pools(r)]
    fig = Figure(figsize=(4.0 * max(1, len(rows)), 3.8))
    FigureCanvasAgg(fig)
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no compressor pools visual tokens", ha="center", va="center")
        ax.set_axis_off()
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        groups: dict[str, dict[str, float]] = {}
        for by_diff in r["path_shares_by_difficulty"].values():
            groups.update(by_diff)
        groups = {d: groups[d] for d in sorted(groups, key=_difficulty_key)}
        if not groups:
            groups = {"all": Counter()}
            for s in r["path_shares"].values():
                groups["all"].update({k: v / len(r["path_shares"]) for k, v in s.items()})
        names = list(groups)
        labels = sorted({p for g in groups.values() for p in g})
        bottom = [0.0] * len(names)
        for label in labels:
            heights = [groups[n].get(label, 0.0) for n in names]
            ax.bar(names, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of samples (%)")
        ax.set_title(f"{r['model']}/{r['compressor']}", fontsize=9)
        ax.legend(title="path (factor per DPE)", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----- tracking ----------------------------------------------------------------------------------------
def _metric_key(*parts: str) -> str:
    return "/".join(_METRIC_KEY_BAD.sub("_", str(p)) for p in parts)


def _flat_metrics(prefix: tuple[str, ...], value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_flat_metrics((*prefix, str(k)), v))
        return out
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return {}
    return {_metric_key(*prefix): float(value)}


def child_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one (model, compressor) child run: `eval/<benchmark>/<metric>` (percent,
    MME as scores), `flops/...` with units in the name, `routing/<benchmark>/[<difficulty>/]share_pct/<path>`."""
    m: dict[str, float] = {}
    for bench, metrics in row["metrics"].items():
        m.update(_flat_metrics(("eval", bench), metrics))
        if row["accuracy"][bench] is not None:
            m[_metric_key("eval", bench, "primary")] = float(row["accuracy"][bench])
    m["eval/num_samples"] = float(row["num_samples"])
    for key, name in (
        ("prefill_tflops_per_sample", "prefill_tflops_per_sample"),
        ("prefill_tflops_exact_per_sample", "prefill_tflops_exact_per_sample"),
        ("baseline_prefill_tflops_per_sample", "baseline_prefill_tflops_per_sample"),
        ("vision_tflops_per_sample", "vision_tflops_per_sample"),
        ("saving_vs_uncompressed_pct", "prefill_saving_vs_uncompressed_pct"),
        ("saving_vs_none_pct", "prefill_saving_vs_none_pct"),
    ):
        if row[key] is not None:
            m[_metric_key("flops", name)] = float(row[key])
    for bench, value in row["prefill_tflops_by_benchmark"].items():
        if value is not None:
            m[_metric_key("flops", bench, "prefill_tflops_per_sample")] = float(value)
    for bench, shares in row["path_shares"].items():
        m.update(_flat_metrics(("routing", bench, "share_pct"), shares))
    for bench, by_diff in row["path_shares_by_difficulty"].items():
        for difficulty, shares in by_diff.items():
            m.update(_flat_metrics(("routing", bench, difficulty, "share_pct"), shares))
    for bench, by_diff in row.get("prefill_tflops_by_difficulty", {}).items():
        for difficulty, value in by_diff.items():
            if value is not None:
                m[_metric_key("routing", bench, difficulty, "prefill_tflops_per_sample")] = float(value)
    return m


def routing_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """How one (model, compressor) row routed, as the pipeline summary reports it: `path_share` {path:
    share in [0, 1]} over all samples, `path_share_by_difficulty` {level: {path: share}} and
    `mean_tflops_by_difficulty` {level: prefill TFLOPs per sample} (levels easiest first: the synthetic
    benchmark's), `accuracy_by_difficulty` {level: primary metric}, and `path_share_by_benchmark`."""
    n = {b: m.get("num_samples") for b, m in row["metrics"].items()}
    weights = {b: (n[b] if isinstance(n[b], int) else 1) for b in row["path_shares"]}
    total = sum(weights.values()) or 1
    overall: dict[str, float] = defaultdict(float)
    for bench, shares in row["path_shares"].items():
        for path, pct in shares.items():
            overall[path] += pct / 100.0 * weights[bench] / total
    by_diff: dict[str, dict[str, float]] = {}
    for per_bench in row["path_shares_by_difficulty"].values():
        for level, shares in per_bench.items():
            by_diff[level] = {p: v / 100.0 for p, v in shares.items()}
    tflops: dict[str, float] = {}
    for per_bench in row.get("prefill_tflops_by_difficulty", {}).values():
        tflops.update({k: v for k, v in per_bench.items() if v is not None})
    acc: dict[str, float] = {}
    for per_bench in row["accuracy_by_difficulty"].values():
        acc.update(per_bench)
    order = sorted(set(by_diff) | set(tflops) | set(acc), key=_difficulty_key)
    return {
        "path_share": dict(sorted(overall.items())),
        "path_share_by_difficulty": {d: by_diff[d] for d in order if d in by_diff},
        "mean_tflops_by_difficulty": {d: tflops[d] for d in order if d in tflops},
        "accuracy_by_difficulty": {d: acc[d] for d in order if d in acc},
        "path_share_by_benchmark": {b: {p: v / 100.0 for p, v in s.items()} for b, s in row["path_shares"].items()},
    }


def format_routing_table(summary: Mapping[str, Any]) -> str:
    """Per (model, compressor) that pools, per difficulty level: share of samples on each path (%), mean
    prefill TFLOPs per sample and accuracy -- whether routers send harder samples down gentler paths."""
    lines: list[list[str]] = []
    for r in summary["rows"]:
        if not _pools(r):
            continue
        rs = routing_summary(r)
        paths = sorted(rs["path_share"], key=lambda p: -rs["path_share"][p])
        lines.append([f"{r['model']}/{r['compressor']}", *paths, "TFLOPs/sample", "accuracy"])
        levels = list(rs["path_share_by_difficulty"]) or ["all"]
        for level in levels:
            shares = rs["path_share_by_difficulty"].get(level, rs["path_share"])
            lines.append([f"  {level}", *[_fmt(100 * shares.get(p, 0.0), 1) for p in paths],
                          "-" if level not in rs["mean_tflops_by_difficulty"] else
                          f"{rs['mean_tflops_by_difficulty'][level]:.4g}", _fmt(rs["accuracy_by_difficulty"].get(level))])
        lines.append([""])
    if not lines:
        return "no compressor pools visual tokens"
    out = []
    for line in lines:
        out.append("  ".join(c.ljust(14 if i == 0 else 9) for i, c in enumerate(line)).rstrip())
    return "\n".join(out).rstrip()


def _predictions_table(row: Mapping[str, Any], truth: Mapping[str, Mapping[tuple[str, Any], Mapping[str, Any]]]) -> dict:
    """All answers of a row as a table in the layout `mlflow.log_table` writes ({"columns", "data"})."""
    columns = ["benchmark", "question_id", "category", "difficulty", "prediction", "answer", "routing_path",
               "prefill_tflops"]
    data = []
    for bench, path in row["predictions"].items():
        for rec in load_jsonl(path):
            g = truth[bench].get(_qid_key(rec["question_id"]), {})
            meta = rec["metadata"]
            answer = g.get("answer", g.get("answers"))
            data.append([bench, rec["question_id"], meta.get("category"), meta.get("difficulty"), rec["text"],
                         answer, meta["routing_path"], meta["prefill_tflops"]])
    return {"columns": columns, "data": data}


def _log_to_mlflow(
    summary: dict[str, Any],
    config: EvalConfig,
    tracking: TrackingOptions,
    figures: Mapping[str, Path],
    truth: Mapping[str, Mapping[tuple[str, Any], Mapping[str, Any]]],
) -> None:
    """Every MLflow call of the evaluation (through `pipelines.tracking`): child runs per (model,
    compressor) under the evaluation run, their metrics, predictions, table and figures. Fills in
    `summary["mlflow"]` and each row's `mlflow_run_id`."""
    from pipelines.tracking import RunTracker

    common = dict(tracking_uri=tracking.tracking_uri, work_dir=tracking.work_dir, experiment=tracking.experiment)
    own_parent = tracking.parent_run_id is None
    parent = RunTracker.open(
        **common,
        run_id=tracking.parent_run_id,
        run_name=tracking.run_name if own_parent else None,
        run_key=f"evaluate:{summary['fingerprint']}" if own_parent else None,
        tags={"dpn.step": "evaluate"} if own_parent else None,
    )
    tables_tag = json.dumps([{"path": "tables/predictions.json", "type": "table"}])
    try:
        for row in summary["rows"]:
            child = RunTracker.open(
                **common,
                parent_run_id=parent.run_id,
                run_name=f"{row['model']}/{row['compressor']}",
                run_key=f"evaluate:{summary['fingerprint']}:{row['model']}/{row['compressor']}",
                tags={"dpn.model": row["model"], "dpn.compressor": row["compressor"], "mlflow.loggedArtifacts": tables_tag},
            )
            with child:
                target = next(t for t in config.targets if t.name == row["model"])
                child.log_params({
                    "model": row["model"], "model_dir": str(target.model_dir), "compressor": row["compressor"],
                    "benchmarks": ",".join(config.benchmarks), "limit": str(config.limit),
                    "template": config.template, "batch_size": str(config.batch_size),
                    "max_new_tokens": str(config.max_new_tokens), "shard_size": str(config.shard_size),
                    "dtype": config.dtype,
                })
                child.log_metrics(child_metrics(row), step=0)
                for bench, path in row["predictions"].items():
                    child.log_artifact(path, f"predictions/{bench}")
                    child.log_artifact(Path(path).with_name("metrics.json"), f"metrics/{bench}")
                child.log_dict(_predictions_table(row, truth), "tables/predictions.json")
                for fig in figures.values():
                    child.log_artifact(fig, "figures")
            row["mlflow_run_id"] = child.run_id
        for fig in figures.values():
            parent.log_artifact(fig, "figures")
        parent.log_metrics({
            "throughput/samples_per_s": summary["samples_per_s"],
            "eval/shards_computed": summary["shards"]["computed"],
            "eval/shards_reused": summary["shards"]["reused"],
            "eval/shards_retried": len(summary["shards"]["retried"]),
        }, step=0)
        parent.log_dict({k: v for k, v in summary.items() if k != "mlflow"}, "evaluation/summary.json")
    finally:
        if own_parent:
            parent.finish()
    summary["mlflow"] = {"parent_run_id": parent.run_id, "tracking_uri": parent.tracking_uri,
                         "experiment": tracking.experiment}


# ----- entry point -------------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_evaluation(
    config: EvalConfig, *, tracking: TrackingOptions | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Evaluate every (model, compressor) on every benchmark; see the module docstring.

    Args:
        config: what to evaluate and how.
        tracking: where to log in MLflow; None = no tracking.
        log: progress lines (default: stderr).
    Returns:
        The summary (also written to `<out_dir>/summary.json`): `rows`, one per (model, compressor), with
        accuracy per benchmark (primary metric) and by difficulty (synthetic), full metrics, prefill
        TFLOPs/sample overall and per benchmark, saving vs the `none` compressor and vs the uncompressed
        input, routing-path shares by benchmark and difficulty, prediction files and the MLflow run id;
        `shards` (computed / reused / retried); `figures`; `mlflow`. `format_table` renders it.
    Raises:
        EvalShardsFailed: a shard failed `max_attempts` times (finished shards stay on disk; re-running
            resumes from them). EvalDataError / FileNotFoundError / ValueError: bad data or checkpoint.
    """
    log = log or _stderr
    t0 = time.perf_counter()
    out_root = Path(config.out_dir)
    compressors: dict[str, list[str]] = {}
    for target in config.targets:
        saved = check_checkpoint(target.model_dir, "none")
        compressors[target.name] = target.compressors or [saved.get("compressor", "dpn")]
        for c in compressors[target.name]:
            check_checkpoint(target.model_dir, c, target.budget if c == "dpn" else None)
    data = {b: load_benchmark(b, config.data_root, config.limit) for b in config.benchmarks}
    truth = {b: {_qid_key(r["question_id"]): r for r in d.ground_truth} for b, d in data.items()}
    use_gpu, n_workers = _placement(config)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    tasks = plan_shards(config, data, compressors, _code_version(), dtype)
    unknown = sorted(set(config.inject_failures) - {t.key for t in tasks})
    if unknown:
        raise ValueError(f"inject_failures names no shard of this evaluation: {unknown}; shards: {tasks[0].key} ...")
    pending = [t for t in tasks if not Path(t.path).is_file()]
    log(f"evaluate: {len(tasks)} shard(s), {len(tasks) - len(pending)} reused from {out_root}")
    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    fan_out_seconds = 0.0
    if pending:
        settings = WorkerSettings(
            models={t.name: (str(t.model_dir), str(resolve_tokenizer_dir(t)), t.budget) for t in config.targets},
            template=config.template, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
            dtype=dtype, threads=max(1, int(config.cpus_per_worker)), inject_failures=dict(config.inject_failures),
            use_gpu=use_gpu,
        )
        done, failed, fan_out_seconds = _run_shards(pending, settings, config, n_workers, log)

    # Gather and score every (model, compressor, benchmark) whose shards are all there.
    per_pair: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    incomplete: set[tuple[str, str, str]] = {(t.target, t.compressor, t.benchmark) for t in tasks if t.key in failed}
    by_group: dict[tuple[str, str, str], list[ShardTask]] = defaultdict(list)
    for t in tasks:
        by_group[(t.target, t.compressor, t.benchmark)].append(t)
    for (target, compressor, bench), group in by_group.items():
        if (target, compressor, bench) in incomplete:
            continue
        records = [r for t in sorted(group, key=lambda t: t.index) for r in load_jsonl(t.path)]
        folder = out_root / target / compressor / bench
        predictions = folder / "predictions.jsonl"
        write_answers(predictions, records)
        metrics = score(bench, records, data[bench].ground_truth)
        result = {
            "benchmark": bench, "model": target, "compressor": compressor, "metrics": metrics,
            "primary": primary_metric(bench, metrics), **aggregate(records), "predictions": str(predictions),
        }
        _write_json(folder / "metrics.json", result)
        per_pair[(target, compressor)][bench] = result

    rows = [
        _row(t.name, c, {b: per_pair[(t.name, c)][b] for b in config.benchmarks})
        for t in config.targets
        for c in compressors[t.name]
        if all(b in per_pair[(t.name, c)] for b in config.benchmarks)
    ]
    _fill_saving_vs_none(rows)
    n_computed = len(done)
    samples_computed = sum(len(t.items) for t in tasks if t.key in done)
    summary: dict[str, Any] = {
        "status": "failed" if failed else "succeeded",
        "fingerprint": _digest(sorted(t.fingerprint for t in tasks))[:16],
        "out_dir": str(out_root),
        "benchmarks": list(config.benchmarks),
        "rows": rows,
        "shards": {
            "total": len(tasks),
            "computed": n_computed,
            "reused": len(tasks) - len(pending),
            "retried": {k: n for k, n in sorted(done.items()) if n > 1},
            "failed": dict(sorted(failed.items())),
        },
        # Answered questions per second of fan-out wall time (worker start-up and model loading included).
        "samples_per_s": samples_computed / fan_out_seconds if fan_out_seconds > 0 else None,
        "seconds": None,
        "figures": {},
        "mlflow": None,
    }
    if failed:
        summary["seconds"] = time.perf_counter() - t0
        _write_json(out_root / "summary.json", summary)
        raise EvalShardsFailed(
            f"{len(failed)} shard(s) failed after {config.max_attempts} attempt(s): "
            + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
            + f". Finished shards are kept under {out_root}; re-run to resume.",
            summary,
        )
    figures = {
        "accuracy_vs_flops": plot_accuracy_vs_flops(summary, out_root / "figures" / "accuracy_vs_flops.png"),
        "routing_by_difficulty": plot_routing_by_difficulty(summary, out_root / "figures" / "routing_by_difficulty.png"),
    }
    summary["figures"] = {k: str(v) for k, v in figures.items()}
    if tracking is not None:
        _log_to_mlflow(summary, config, tracking, figures, truth)
    summary["seconds"] = time.perf_counter() - t0
    _write_json(out_root / "summary.json", summary)
    return summary


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


__all__ = [
    "BENCHMARK_FILES",
    "BenchmarkData",
    "BenchmarkFiles",
    "EvalConfig",
    "EvalShardsFailed",
    "EvalTarget",
    "InjectedShardFailure",
    "ShardRunner",
    "ShardTask",
    "TrackingOptions",
    "aggregate",
    "check_checkpoint",
    "child_metrics",
    "format_table",
    "load_benchmark",
    "load_model",
    "path_label",
    "plan_shards",
    "plot_accuracy_vs_flops",
    "plot_routing_by_difficulty",
    "predict",
    "run_evaluation",
]
