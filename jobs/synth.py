"""`dpn synth`: write the synthetic LLaVA-format corpus (see `pipelines/data/synth/`)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic shape corpus (LCS-558K / mix665K / eval layouts + tokenizer)",
        description="Write images, pretrain.json, instruct.json, eval/synthetic/ and tokenizer/ to --out, "
        "deterministically for a seed. Prints one JSON summary as the last line.",
    )
    p.add_argument("--out", required=True, help="output directory (absent, empty, or a corpus of the same config)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> byte-identical corpus)")
    p.add_argument("--pretrain", type=int, default=2000, help="records in pretrain.json (default 2000)")
    p.add_argument("--instruct", type=int, default=2000, help="records in instruct.json (default 2000)")
    p.add_argument("--eval", type=int, default=300, help="benchmark questions (default 300)")
    p.add_argument("--calibration", type=int, default=0,
                   help="held-out records in calibration.json for fitting routers / the budget (default 0: none)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary bound (default 1024)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipelines.data.synth.corpus import generate_corpus

    try:
        summary = generate_corpus(
            args.out, seed=args.seed, n_pretrain=args.pretrain, n_instruct=args.instruct, n_eval=args.eval,
            vocab_size=args.vocab_size, n_calibration=args.calibration,
        )
    except (ValueError, FileExistsError) as e:
        print(f"dpn synth: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
