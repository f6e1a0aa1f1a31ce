"""`dpn train`: train a recipe's stages with Ray Train + DeepSpeed, tracked in MLflow.

    dpn train --recipe tiny                                  stage 1 then stage 2 (the embedded default)
    dpn train --recipe tiny --stage 1 --set optim.max_steps=20
    dpn train --recipe llava-1.5-7b --set model.llm_path=/ckpt/vicuna-7b-v1.5 --set ...

`--set key.path=value` overrides any recipe field, type-checked (`pipelines.recipes.apply_overrides`);
the same overrides apply to both stages. A bad value fails before Ray starts, naming the field.
Re-running the same command resumes an interrupted stage and skips a finished one. The last stdout line
is one JSON object: the stages' results.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe (stage 1 projector, stage 2 DPN) with Ray Train + DeepSpeed")
    p.add_argument("--recipe", default="tiny", help="named recipe (pipelines.recipes.RECIPES), default: tiny")
    p.add_argument("--stage", default="all", choices=("1", "2", "all"),
                   help="which stage(s) to run; 'all' chains stage 2 onto stage 1's outputs (default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--parent-run-id", default=None, help="MLflow run the stage runs are children of "
                   "(default: $DPN_PARENT_RUN_ID)")
    p.add_argument("--print-config", action="store_true", help="print the resolved stage configs and exit")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.recipes import get_recipe

    stages = (1, 2) if args.stage == "all" else (int(args.stage),)
    try:
        # Validate every stage's config (and the overrides) before anything starts.
        configs = {s: get_recipe(args.recipe, s, args.overrides) for s in stages}
        if args.print_config:
            print(json.dumps({f"stage{s}": c.to_dict() for s, c in configs.items()}))
            return 0
        for cfg in configs.values():
            cfg.check_paths()
    except (ValueError, FileNotFoundError) as e:
        print(f"dpn train: {e}", file=sys.stderr)
        return 2
    from pipelines.train import run_recipe

    results = run_recipe(args.recipe, args.stage, args.overrides, parent_run_id=args.parent_run_id)
    print(json.dumps({"recipe": args.recipe, "stages": [r.to_dict() for r in results]}))
    return 0
