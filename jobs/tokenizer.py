"""`dpn tokenizer prepare`: make a Vicuna / LLaMA tokenizer ready for DPN.

    dpn tokenizer prepare --from /models/vicuna-7b-v1.5 --out /data/tokenizer-dpn --router-token

Adds `<image>` (and `<ROUTER>` with --router-token) as special tokens and a pad token where missing,
saves the tokenizer to --out and records the ids in --out/dpn_tokens.json; prints that record as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="prepare a Vicuna/LLaMA tokenizer for DPN (<image>, <ROUTER>, pad)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tsub.add_parser("prepare", help="add <image> (and <ROUTER>) and a pad token; save with the ids recorded")
    q.add_argument("--from", dest="src", required=True, help="tokenizer directory (save_pretrained layout)")
    q.add_argument("--out", required=True, help="new or empty output directory")
    q.add_argument("--router-token", action="store_true", help="also add <ROUTER> (recipes that route on it)")
    q.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from dpn.tokenizer import prepare_tokenizer

    try:
        record = prepare_tokenizer(args.src, args.out, router_token=args.router_token)
    except (OSError, ValueError) as e:
        print(f"dpn tokenizer prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0
