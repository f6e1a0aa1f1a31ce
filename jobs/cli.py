"""The `dpn` command line. Each sub-command lives in its own module under `jobs/` and exposes
`register(subparsers)`; heavy imports happen inside the handlers, so `dpn --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# (sub-command module under jobs/) in the order `dpn --help` lists them.
_COMMAND_MODULES = (
    "jobs.demo",
    "jobs.flops",
    "jobs.convert",
    "jobs.synth",
    "jobs.preprocess",
    "jobs.train",
    "jobs.eval",
    "jobs.pipeline",
    "jobs.submit",
    "jobs.tokenizer",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpn", description="Dynamic Pyramid Network pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        # A listed sub-command whose module is missing is a broken install: fail, naming it, rather than
        # drop the command from `dpn --help`.
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc = args.handler(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
