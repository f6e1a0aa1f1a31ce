"""`dpn eval ...`: evaluation sub-commands.

    dpn eval score --benchmark NAME --predictions FILE --ground-truth FILE [--allow-extra-predictions]

prints the benchmark's metrics as one JSON object on the last stdout line; bad input (unknown
benchmark, malformed line, missing or duplicate ids, unreadable file) exits with code 2 and a message
on stderr naming the file/line, id or name.

    dpn eval convert --benchmark vqav2|gqa|vizwiz|scienceqa|textvqa|pope|mme|mmbench|seed
                     --annotations FILE --out DIR/ground_truth.jsonl [--questions FILE]

writes the scorer's ground truth from a benchmark's official annotation file (dpn/eval/convert.py; where a
question file is needed also DIR/questions.jsonl) and prints a JSON summary; bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score benchmark predictions (and run evaluations)")
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="{score,run,convert}")
    _register_score(commands)
    _register_convert(commands)
    # ---- `dpn eval run` ------------------------------------------------------------------------
    _register_run(commands)
    # ------------------------------------------------------------------------------------------


def _register_score(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "score",
        help="score a LLaVA answer jsonl against ground truth",
        description="Score LLaVA-format predictions with the official-equivalent rules of a benchmark.",
    )
    p.add_argument("--benchmark", required=True, help="vqav2, gqa, textvqa, scienceqa, pope, mme, mmbench, "
                   "seed, vizwiz or synthetic")
    p.add_argument("--predictions", required=True, help="LLaVA answer jsonl (question_id, text, ...)")
    p.add_argument("--ground-truth", required=True, help="ground-truth jsonl, one record per question")
    p.add_argument(
        "--allow-extra-predictions",
        action="store_true",
        help="score only the ground-truth questions when the predictions cover more",
    )
    p.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    from dpn.eval.scoring import EvalDataError, score_files

    try:
        metrics = score_files(
            args.benchmark,
            args.predictions,
            args.ground_truth,
            allow_extra_predictions=args.allow_extra_predictions,
        )
    except (EvalDataError, OSError, UnicodeDecodeError) as e:
        print(f"dpn eval score: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


def _register_convert(commands: argparse._SubParsersAction) -> None:
    from dpn.eval.convert import CONVERTIBLE  # no torch: ~30 ms at CLI start

    p = commands.add_parser(
        "convert",
        help="write ground_truth.jsonl from a benchmark's official annotation files (all 9 of the LLaVA-1.5 suite)",
        description="Convert a benchmark's official annotation file into the scorer's ground_truth.jsonl "
        "(written atomically). VQAv2: v2_mscoco_val2014_annotations.json (test-dev answers are not public); "
        "GQA: testdev_balanced_questions.json; TextVQA: TextVQA_0.5.1_val.json. --questions also writes "
        "questions.jsonl beside --out, which `dpn eval run` prefers over LLaVA's file: VQAv2 takes "
        "v2_OpenEnded_mscoco_val2014_questions.json, TextVQA LLaVA's llava_textvqa_val_v051_ocr.jsonl "
        "(whose question_id is the image id, re-keyed here to TextVQA's question ids). MME: --annotations is "
        "the MME_Benchmark_release_version directory and --questions LLaVA's llava_mme.jsonl (required: its "
        "two questions per image share the image path as question_id; re-keyed here to '<path>#0' / '#1'). "
        "VizWiz: val.json (test answers are not public); writes questions.jsonl too. POPE: a "
        "coco_pope_<split>.json or their directory; --questions LLaVA's llava_pope_test.jsonl, else that file is "
        "written as questions.jsonl. ScienceQA: problems.json with --questions LLaVA's llava_test_CQM-A.json, "
        "or pid_splits.json beside it (test split). MMBench: the TSV. SEED: SEED-Bench.json, --questions "
        "LLaVA's llava-seed-bench.jsonl to keep exactly its questions.",
    )
    p.add_argument("--benchmark", required=True, choices=CONVERTIBLE)
    p.add_argument("--annotations", required=True, help="the official annotation file (MME: its release "
                   "directory; POPE: a coco_pope_<split>.json or their directory)")
    p.add_argument("--out", required=True, help="ground truth to write: DATA_ROOT/<benchmark folder>/ground_truth.jsonl")
    p.add_argument("--questions", default=None, help="vqav2: official questions JSON; textvqa: LLaVA's "
                   "llava_textvqa_val_v051_ocr.jsonl; mme (required): LLaVA's llava_mme.jsonl; pope: "
                   "llava_pope_test.jsonl; scienceqa: llava_test_CQM-A.json; seed: llava-seed-bench.jsonl "
                   "(not for gqa, vizwiz, mmbench)")
    p.add_argument("--questions-out", default=None, help="where to write the question file (default: "
                   "questions.jsonl beside --out)")
    p.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from dpn.eval.convert import convert_files
    from dpn.eval.scoring import EvalDataError

    try:
        summary = convert_files(args.benchmark, args.annotations, args.out, questions=args.questions,
                                questions_out=args.questions_out)
    except (EvalDataError, OSError, UnicodeDecodeError) as e:
        print(f"dpn eval convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


# ---- `dpn eval run`: the Ray fan-out (pipelines/evaluation/) ----------------------------------------
def _register_run(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "run",
        help="evaluate a checkpoint on benchmarks, fanned out over Ray workers, tracked in MLflow",
        description="Split every benchmark into shards, answer them on Ray workers (one per GPU, else CPU "
        "workers), score them and write predictions jsonl + metrics JSON per (model, compressor, benchmark). "
        "Finished shards are reused on a re-run. Prints the results table, then one JSON summary as the last "
        "line; exits 1 when shards still fail after retries, 2 on bad input.",
    )
    p.add_argument("--model", required=True, help="save_pretrained directory of the DPN checkpoint")
    p.add_argument("--benchmarks", required=True, help="comma-separated: vqav2,gqa,textvqa,scienceqa,pope,mme,"
                   "mmbench,seed,vizwiz,synthetic")
    p.add_argument("--data-root", required=True, help="LLaVA's playground/data/eval (or dpn synth's DIR/eval)")
    p.add_argument("--compressors", default=None, help="comma-separated: dpn,static,random,none,fastv,pdrop "
                   "(default: the one the checkpoint was saved with)")
    p.add_argument("--budget", type=float, default=None,
                   help="dpn: target mean LLM prefill FLOPs as a fraction of the uncompressed model (e.g. 0.6), "
                   "reached through the checkpoint's calibrated budget curve (default: the checkpoint's own)")
    p.add_argument("--out", default=".dpn_work/eval", help="output directory (default .dpn_work/eval)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    p.add_argument("--name", default=None, help="model name in outputs and MLflow (default: the model folder's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory or "
                   "its tokenizer/ folder)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--shard-size", type=int, default=128, help="questions per shard (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation cap (default 16)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else CPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="num_cpus of each worker (default 1)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-attempts", type=int, default=3, help="attempts per shard before it is reported failed")
    p.add_argument("--template", default="vicuna_v1", help="conversation template (default vicuna_v1)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else SQLite under --work-dir)")
    p.add_argument("--work-dir", default=".dpn_work", help="root of the default MLflow store (default .dpn_work)")
    p.add_argument("--experiment", default="dpn", help="MLflow experiment (default dpn)")
    p.add_argument("--parent-run-id", default=None, help="MLflow run to nest the child runs under "
                   "(default: $DPN_PARENT_RUN_ID, else a new 'evaluate' run)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=_run)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _run(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from dpn.eval.scoring import EvalDataError
    from pipelines.evaluation.config import EvalConfig, EvalTarget
    from pipelines.evaluation.report import format_table
    from pipelines.evaluation.run import EvalShardsFailed, TrackingOptions, run_evaluation
    from pipelines.tracking import resolve_parent_run_id

    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", Path(args.model).resolve().name).lstrip("._-") or "model"
    try:
        config = EvalConfig(
            targets=[EvalTarget(name=name, model_dir=args.model, compressors=_split(args.compressors),
                                tokenizer_dir=args.tokenizer, budget=args.budget)],
            benchmarks=_split(args.benchmarks) or [],
            data_root=args.data_root,
            out_dir=args.out,
            limit=args.limit,
            template=args.template,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            device=args.device,
            num_workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            max_attempts=args.max_attempts,
        )
        tracking = None if args.no_tracking else TrackingOptions(
            tracking_uri=args.tracking_uri, work_dir=args.work_dir, experiment=args.experiment,
            parent_run_id=resolve_parent_run_id(args.parent_run_id),
        )
        summary = run_evaluation(config, tracking=tracking)
    except EvalShardsFailed as e:
        print(f"dpn eval run: error: {e}", file=sys.stderr)
        print(json.dumps(e.summary, default=str))
        return 1
    except (EvalDataError, ValueError, OSError) as e:
        print(f"dpn eval run: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(json.dumps(summary, default=str))
    return 0
