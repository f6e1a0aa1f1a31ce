"""An evaluation end to end (`run_evaluation`): benchmarks split into shards, shards run by Ray actors (one
per GPU, or per CPU slot: `fanout`), answers gathered, scored with `dpn.eval`, written in LLaVA's answer
format, reported (`report`) and tracked in MLflow (through `pipelines.tracking`).

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

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpn.eval.benchmarks import write_answers
from dpn.eval.scoring import load_jsonl, primary_metric, score
from dpn.inference import check_checkpoint, find_tokenizer_dir
from pipelines import tracking as mlflow_tracking
from pipelines.dag import fingerprint
from pipelines.evaluation.benchmarks import BenchmarkData, load_benchmark, qid_key
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.fanout import (
    ShardTask,
    WorkerSettings,
    code_version,
    placement,
    plan_shards,
    run_shards,
)
from pipelines.evaluation.report import (
    aggregate,
    child_metrics,
    fill_saving_vs_none,
    plot_accuracy_vs_flops,
    plot_routing_by_difficulty,
    predictions_table,
    summary_row,
)


class EvalShardsFailed(RuntimeError):
    """Some shards still failed after `max_attempts`; `summary` holds what did finish and the failures."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


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


def _child_key(fp: str, model: str, compressor: str) -> str:
    return f"evaluate:{fp}:{model}/{compressor}"


def _open_mlflow_runs(config: EvalConfig, tracking: TrackingOptions, fp: str, compressors: Mapping[str, list[str]],
                      reused: list[ShardTask]) -> tuple[Callable[[ShardTask, int], None], list[Any]]:
    """Create the evaluation's MLflow runs when it starts (status RUNNING, params logged), so the UI shows
    them while shards run. Returns the `run_shards` callback that logs each child's progress live
    (`eval/shards_done`, `eval/answers_done`) and the runs opened here (finished as FAILED if shards fail;
    else `_log_to_mlflow` finds them again by key and finishes them)."""
    RunTracker = mlflow_tracking.RunTracker
    common = dict(tracking_uri=tracking.tracking_uri, work_dir=tracking.work_dir, experiment=tracking.experiment)
    own_parent = tracking.parent_run_id is None
    parent = RunTracker.open(**common, run_id=tracking.parent_run_id,
                             run_name=tracking.run_name if own_parent else None,
                             run_key=f"evaluate:{fp}" if own_parent else None,
                             tags={"dpn.step": "evaluate"} if own_parent else None)
    children = {}
    for target in config.targets:
        for comp in compressors[target.name]:
            child = RunTracker.open(**common, parent_run_id=parent.run_id, run_name=f"{target.name}/{comp}",
                                    run_key=_child_key(fp, target.name, comp),
                                    tags={"dpn.model": target.name, "dpn.compressor": comp})
            child.log_params({
                "model": target.name, "model_dir": str(target.model_dir), "compressor": comp,
                "benchmarks": ",".join(config.benchmarks), "limit": str(config.limit),
                "template": config.template, "batch_size": str(config.batch_size),
                "max_new_tokens": str(config.max_new_tokens), "shard_size": str(config.shard_size),
                "dtype": config.dtype,
            })
            children[(target.name, comp)] = child
    # A resumed evaluation finds the same runs by key: count on from its reused shards, not from 0, so the
    # progress metrics' steps do not repeat the first attempt's.
    progress = {key: [0, 0] for key in children}
    for t in reused:
        progress[(t.target, t.compressor)][0] += 1
        progress[(t.target, t.compressor)][1] += len(t.items)

    def on_done(task: ShardTask, n_answers: int) -> None:
        key = (task.target, task.compressor)
        done = progress[key]
        done[0] += 1
        done[1] += n_answers
        children[key].log_metrics({"eval/shards_done": done[0], "eval/answers_done": done[1]}, step=done[0])

    return on_done, [*children.values(), *([parent] if own_parent else [])]


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
    RunTracker = mlflow_tracking.RunTracker
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
                run_key=_child_key(summary["fingerprint"], row["model"], row["compressor"]),
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
                child.log_dict(predictions_table(row, truth), "tables/predictions.json")
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


# ~100 lines with its docstring: the evaluation's stages in order (check, plan, fan out, score, report, log),
# inside one try that finishes the live MLflow runs as FAILED on any error (they are opened before the fan-out).
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
    compressors = _checked_compressors(config)
    data = {b: load_benchmark(b, config.data_root, config.limit) for b in config.benchmarks}
    use_gpu, n_workers = placement(config)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    tasks = plan_shards(config, data, compressors, code_version(), dtype)
    unknown = sorted(set(config.inject_failures) - {t.key for t in tasks})
    if unknown:
        raise ValueError(f"inject_failures names no shard of this evaluation: {unknown}; shards: {tasks[0].key} ...")
    pending = [t for t in tasks if not Path(t.path).is_file()]
    log(f"evaluate: {len(tasks)} shard(s), {len(tasks) - len(pending)} reused from {out_root}")
    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    fan_out_seconds = 0.0
    fp = fingerprint(sorted(t.fingerprint for t in tasks))[:16]
    pending_keys = {t.key for t in pending}
    reused = [t for t in tasks if t.key not in pending_keys]
    on_done, opened = (_open_mlflow_runs(config, tracking, fp, compressors, reused) if tracking is not None
                       else (None, []))
    try:
        if pending:
            done, failed, fan_out_seconds = run_shards(pending, _worker_settings(config, dtype, use_gpu), config,
                                                       n_workers, log, on_done=on_done)

        per_pair = _score(tasks, failed, data, out_root)
        rows = [
            summary_row(t.name, c, {b: per_pair[(t.name, c)][b] for b in config.benchmarks})
            for t in config.targets
            for c in compressors[t.name]
            if all(b in per_pair[(t.name, c)] for b in config.benchmarks)
        ]
        fill_saving_vs_none(rows)
        samples_computed = sum(len(t.items) for t in tasks if t.key in done)
        summary: dict[str, Any] = {
            "status": "failed" if failed else "succeeded",
            "fingerprint": fp,
            "out_dir": str(out_root),
            "benchmarks": list(config.benchmarks),
            "rows": rows,
            "shards": {"total": len(tasks), "computed": len(done), "reused": len(tasks) - len(pending),
                       "retried": {k: n for k, n in sorted(done.items()) if n > 1}, "failed": dict(sorted(failed.items()))},
            # Answered questions per second of fan-out wall time (worker start-up and model loading included).
            "samples_per_s": samples_computed / fan_out_seconds if fan_out_seconds > 0 else None,
            "seconds": None,
            "figures": {},
            "mlflow": None,
        }
        if failed:
            for run in opened:
                run.finish("FAILED")
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
            truth = {b: {qid_key(r["question_id"]): r for r in d.ground_truth} for b, d in data.items()}
            _log_to_mlflow(summary, config, tracking, figures, truth)
        summary["seconds"] = time.perf_counter() - t0
        _write_json(out_root / "summary.json", summary)
        return summary
    except EvalShardsFailed:
        raise  # its runs are finished FAILED above
    except BaseException:
        # Opened live when the step started: an error or Ctrl-C must not leave them RUNNING.
        for run in opened:
            run.finish("FAILED")
        raise


def _checked_compressors(config: EvalConfig) -> dict[str, list[str]]:
    """{target name: its compressors} (default: the one it was saved with), every checkpoint checked for
    every compressor (and budget) before any work starts."""
    compressors: dict[str, list[str]] = {}
    for target in config.targets:
        saved = check_checkpoint(target.model_dir, "none")
        compressors[target.name] = target.compressors or [saved.get("compressor", "dpn")]
        for c in compressors[target.name]:
            check_checkpoint(target.model_dir, c, target.budget if c == "dpn" else None)
    return compressors


def _worker_settings(config: EvalConfig, dtype: str, use_gpu: bool) -> WorkerSettings:
    return WorkerSettings(
        models={t.name: (str(t.model_dir), str(find_tokenizer_dir(t.model_dir, t.tokenizer_dir)), t.budget)
                for t in config.targets},
        template=config.template, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
        dtype=dtype, threads=max(1, int(config.cpus_per_worker)), inject_failures=dict(config.inject_failures),
        use_gpu=use_gpu,
    )


def _score(tasks: list[ShardTask], failed: Mapping[str, str], data: Mapping[str, BenchmarkData], out_root: Path
           ) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """Gather and score every (model, compressor, benchmark) whose shards are all there: its
    predictions.jsonl and metrics.json are written; returns {(model, compressor): {benchmark: result}}."""
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
    return per_pair


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


__all__ = ["EvalShardsFailed", "TrackingOptions", "run_evaluation"]
