"""`dpn train`: train a recipe's stages with Ray Train + DeepSpeed, tracked in MLflow.

    dpn train --recipe tiny                                  stage 1 then stage 2 (the embedded default)
    dpn train --recipe tiny --stage 1 --set optim.max_steps=20
    dpn train --recipe llava-1.5-7b --set model.llm_path=/ckpt/vicuna-7b-v1.5 --set ...

It runs the steps of the pipeline DAG that the stages need (`pipelines.workflow.training_pipeline`):
the corpus (synthetic, or `--set data.annotations=... data.image_root=... data.tokenizer=...`, or given
shards `--set data.shards=...`), its preprocessing, stage 0 of the tiny recipe, stage 1, stage 2 --
cached like every pipeline step, so re-running the same command trains nothing, and an interrupted
stage resumes from its last checkpoint. `--set key.path=value` overrides any recipe field,
type-checked (`pipelines.recipes.apply_overrides`); the same overrides apply to both stages. A bad value
fails before Ray starts, naming the field. The last stdout line is one JSON object: the steps and the
stages' outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.workflow import TRAIN_STAGES

    p = sub.add_parser("train", help="train a recipe (stage 1 projector, stage 2 DPN) with Ray Train + DeepSpeed")
    p.add_argument("--recipe", default="tiny", help="named recipe (pipelines.recipes.RECIPES), default: tiny")
    p.add_argument("--stage", default="all", choices=TRAIN_STAGES,
                   help="run up to stage 1, or up to stage 2 (with stage 1 first where stage 2 starts from it); "
                   "'all' = both (default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--parent-run-id", default=None, help="MLflow run the training's runs are children of "
                   "(default: $DPN_PARENT_RUN_ID)")
    p.add_argument("--print-config", action="store_true", help="print the resolved stage configs and exit")
    p.set_defaults(handler=run)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from pipelines.recipes import get_recipe
    from pipelines.workflow import run_training, training_pipeline

    stages = (1, 2) if args.stage == "all" else (int(args.stage),)
    try:
        if args.print_config:
            configs = {s: get_recipe(args.recipe, s, args.overrides) for s in stages}
            print(json.dumps({f"stage{s}": c.to_dict() for s, c in configs.items()}))
            return 0
        # Validates every stage's config (and the overrides) before anything starts.
        cfg = training_pipeline(args.recipe, args.stage, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"dpn train: {e}", file=sys.stderr)
        return 2
    from pipelines.run_lock import WorkDirBusy, WorkDirLockUnsupported

    try:
        summary = run_training(cfg, log=_log, parent_run_id=args.parent_run_id)
    except (ConnectionError, WorkDirBusy, WorkDirLockUnsupported, ValueError) as e:  # ValueError: the preflight
        print(f"dpn train: {e}", file=sys.stderr)
        return 2
    import ray

    if ray.is_initialized():
        ray.shutdown()  # flush Ray's forwarded worker logs, so the JSON summary really is the last stdout line
    print(json.dumps({"recipe": args.recipe, **summary}))
    return 0 if summary["status"] == "succeeded" else 1
