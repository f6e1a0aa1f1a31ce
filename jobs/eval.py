"""`dpn eval ...`: evaluation sub-commands.

    dpn eval score --benchmark NAME --predictions FILE --ground-truth FILE [--allow-extra-predictions]

prints the benchmark's metrics as one JSON object on the last stdout line; bad input (unknown
benchmark, malformed line, missing or duplicate ids, unreadable file) exits with code 2 and a message
on stderr naming the file/line, id or name.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score benchmark predictions (and run evaluations)")
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="{score}")
    _register_score(commands)
    # ---- `dpn eval run` goes here --------------------------------------------------------------
    # The Ray fan-out (`dpn eval run --model DIR --benchmarks a,b --data-root DIR ...`) registers its
    # own sub-parser on `commands` with a `_register_run(commands)` next to `_register_score`, sets
    # `handler=` to its function and adds its name to the metavar above. Not implemented here.
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
