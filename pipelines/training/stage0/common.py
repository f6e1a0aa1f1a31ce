"""What the tiny recipe's two stage-0 trainings (`stage0.vision`, `stage0.llm`) share: running as a
one-CPU Ray task that prints its progress, and logging their evaluations to MLflow."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipelines import tracking
from pipelines.recipes import TrainConfig


def _one_thread(fn: Callable[..., dict[str, Any]], label: str, *args: Any) -> dict[str, Any]:
    import torch

    # A one-CPU task: more threads than CPUs slows every process on the node (25x measured on 2 cores).
    torch.set_num_threads(1)

    def progress(row: dict[str, Any]) -> None:  # Ray forwards a task's output to the driver's terminal
        shown = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[{label}] " + " ".join(f"{k}={v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    return fn(*args, on_eval=progress)


def on_one_cpu(fn: Callable[..., dict[str, Any]], label: str, *args: Any) -> dict[str, Any]:
    """`fn(*args, on_eval=...)` as a one-CPU Ray task with one torch thread (local Ray started if none is
    up), so that it shares the node with the other steps' Ray work instead of competing with it from the
    driver; every evaluation row is printed to the driver's terminal as "[label] step=... ..."."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.get(ray.remote(num_cpus=1)(_one_thread).remote(fn, label, *args))


# What each stage-0 part logs: its spec section and the per-evaluation metrics (`stage0/*`).
_STAGE0_METRICS = {
    "vision": ("vision_pretrain", {"stage0/color_accuracy_pct": "color_accuracy_pct",
                                   "stage0/shape_accuracy_pct": "shape_accuracy_pct", "stage0/loss": "loss"}),
    "llm": ("llm_pretrain", {"stage0/llm_accuracy_pct": "accuracy_pct",
                             "stage0/llm_bare_accuracy_pct": "bare_accuracy_pct", "stage0/llm_loss": "loss"}),
}


def log_stage0(part: str, summary: dict[str, Any], cfg: TrainConfig, *, run_id: str | None,
               tracking_uri: str | None = None) -> None:
    """Stage 0's `part` ("vision" or "llm"): params and per-evaluation metrics (with step=) in the MLflow
    run `run_id` (the pipeline step's; None: nothing is logged).

    Args:
        part: "vision" or "llm".
        summary: what `pretrain_vision` / `pretrain_llm` returned (its "evals" rows are logged).
        cfg: the stage-1 config holding the stage-0 spec.
        run_id / tracking_uri: the run to log into (see `pipelines.tracking.resolve_tracking_uri`).
    """
    section, metrics = _STAGE0_METRICS[part]
    tracker = tracking.RunTracker.open(run_id=run_id, tracking_uri=tracking_uri, work_dir=cfg.work_dir,
                                       enabled=run_id is not None,
                                       tags={"dpn.stage": 0, "dpn.stage0_part": part, "dpn.recipe": cfg.recipe})
    tracker.log_params(tracking.flatten_params({section: getattr(cfg, section), "model.preset": cfg.model.preset}))
    for row in summary["evals"]:
        tracker.log_metrics({**{key: row[field] for key, field in metrics.items()}, "time/seconds": row["seconds"]},
                            step=row["step"])
    if part == "llm":
        tracker.log_metrics({"stage0/llm_reached_target": float(summary["reached_target"])}, step=summary["steps"])


__all__ = ["log_stage0", "on_one_cpu"]
