"""`dpn pipeline run|status|plan`: the DPN workflow DAG (see `pipelines/workflow.py`).

`run` prints progress to stderr and, as the last stdout line, one JSON object: tracking_uri,
parent_run_id, steps (name, status ran/cached/failed/skipped, seconds, mlflow_run_id) and results (per
compressor: accuracy, average FLOPs per sample, saving).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run, inspect or plan the workflow DAG")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    for name, handler, help_text in (
        ("run", _run, "run every step that is not already done (cached steps are skipped)"),
        ("status", _status, "which steps are done, cached or failed, with their MLflow run ids"),
        ("plan", _plan, "what `run` would do, without running anything"),
    ):
        q = psub.add_parser(name, help=help_text)
        q.add_argument("--recipe", default=None, help="pipeline recipe: tiny (default) or llava-1.5-7b")
        q.add_argument("--config", default=None, help="YAML/JSON file of PipelineConfig fields overriding the recipe")
        q.add_argument("--work-dir", default=None, help="override the recipe's work_dir")
        if name == "run":
            q.add_argument("--trigger", default="manual", choices=("manual", "scheduled"),
                           help="tag of the run; `scheduled` is what the cron manifests pass")
        q.set_defaults(handler=handler)


def _config(args: argparse.Namespace):
    from pipelines.workflow import load_pipeline_config

    cfg = load_pipeline_config(args.recipe, args.config)
    if args.work_dir:
        cfg.work_dir = str(Path(args.work_dir).absolute())
    return cfg


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fail(msg: str) -> int:
    """Exit status 2 with `msg` on stderr, one line per problem (a ConfigError lists several)."""
    for line in str(msg).splitlines() or [""]:
        print(f"dpn pipeline: error: {line}", file=sys.stderr)
    return 2


def run_and_report(recipe: str | None, config_file: str | None, work_dir: str | None, trigger: str,
                   demo: bool = False) -> int:
    """Run the pipeline; print the results table (demo) and the JSON summary as the last stdout line."""
    from pipelines.workflow import load_pipeline_config, run_pipeline

    try:
        cfg = load_pipeline_config(recipe, config_file)
        if work_dir:
            cfg.work_dir = str(Path(work_dir).absolute())
    except ValueError as e:
        return _fail(str(e))
    t0 = time.time()
    from pipelines.run_lock import WorkDirBusy, WorkDirLockUnsupported

    try:
        summary = run_pipeline(cfg, trigger=trigger, log=_log)
    except (ConnectionError, WorkDirBusy, WorkDirLockUnsupported) as e:
        return _fail(str(e))
    except ValueError as e:  # the preflight: inputs missing or malformed
        return _fail(str(e))
    summary["seconds"] = round(time.time() - t0, 1)
    import ray

    if ray.is_initialized():
        # Flush Ray's forwarded worker logs now, so the JSON summary really is the last stdout line.
        ray.shutdown()
    if demo and summary["eval_summary"]:
        from pipelines.evaluation.report import format_category_table, format_routing_table, format_table

        with open(summary["eval_summary"]) as f:
            eval_summary = json.load(f)
        print(format_table(eval_summary))
        if summary.get("synthetic_chance_pct") is not None:
            print(f"chance on the synthetic benchmark (a uniform guess per question type): "
                  f"{summary['synthetic_chance_pct']:.2f}")
        if summary.get("synthetic_chance_by_category_pct"):
            from pipelines.data.synth.questions import DIFFICULTIES

            print("\n" + format_category_table(eval_summary, summary["synthetic_chance_by_category_pct"],
                                               difficulties=DIFFICULTIES))
        print("\nrouting (share of samples per path %, by difficulty; mean prefill TFLOPs; accuracy)")
        print(format_routing_table(eval_summary))
        reg = summary.get("registry") or {}
        if reg:
            print(f"\nregistry: {reg['model']} v{reg['version']} "
                  f"{'promoted to champion' if reg['promoted'] else 'kept as challenger'} ({reg['reason']})")
        if summary.get("parent_run_id"):
            from pipelines import tracking

            try:
                link = tracking.run_link(summary["parent_run_id"], summary["tracking_uri"])
            except Exception as e:  # the store may be gone by now; the summary line below must still print
                link = f"run {summary['parent_run_id']} on {summary['tracking_uri']} (no link: {e})"
            print(f"\nMLflow run: {link}")
        print(f"pipeline finished {summary['status']} in {summary['seconds']}s\n")
    print(json.dumps(summary))
    return 0 if summary["status"] == "succeeded" else 1


def _run(args: argparse.Namespace) -> int:
    return run_and_report(args.recipe, args.config, args.work_dir, args.trigger)


def _status(args: argparse.Namespace) -> int:
    from pipelines.workflow import build_pipeline

    try:
        status = build_pipeline(_config(args)).status()
    except ValueError as e:
        return _fail(str(e))
    for s in status["steps"]:
        print(f"{s['name']:<28} {s['status']:<8} run {s['mlflow_run_id']}", file=sys.stderr)
    print(json.dumps(status))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipelines.preflight import preflight
    from pipelines.run_lock import holder
    from pipelines.workflow import build_pipeline

    try:
        cfg = _config(args)
        pipe = build_pipeline(cfg)
        plan = pipe.plan()
        problems = preflight(cfg, pipe.steps)  # every missing or malformed input, all at once
    except ValueError as e:
        return _fail(str(e))
    for s in plan:
        print(f"{s['name']:<28} {s['action']:<7} {s['fingerprint']}  <- {', '.join(s['inputs']) or '-'}",
              file=sys.stderr)
    running = holder(pipe.work_dir)  # read only: plan works while a run holds the work dir
    if running:
        print(f"running now: {running.get('run')} (pid {running.get('pid')}, host {running.get('host')}, since "
              f"{running.get('since')})", file=sys.stderr)
    print(json.dumps({"steps": plan, "problems": problems, "running": running}))
    if problems:
        return _fail("\n".join(problems))
    return 0
