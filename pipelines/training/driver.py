"""Where a stage is trained: the driver side of Ray Train. `run_stage(cfg)` trains one stage on its
preprocessed shards with `TorchTrainer` workers, each running a DeepSpeed engine (`worker.train_func`).

    run_stage(cfg)   check -> MLflow run -> TorchTrainer.fit (workers: `pipelines.training.worker`)
                     -> the final checkpoint's model (`model/`) and projector (`projector/`) -> StageResult

Stage 1 trains the projector of plain LLaVA-1.5 (vision tower and LLM frozen); stage 2 trains the LLM,
the projector and the fresh DPE routers (and optionally the vision tower) on LM + routing loss. What
comes before a stage -- the corpus, preprocessing, stage 0 of the tiny recipe, stage 1 for stage 2 -- is
the pipeline's business (`pipelines.workflow`, also behind `dpn train`): the config reaching `run_stage`
names its shards (`data.shards`) and real paths in place of the "<stage0>" / "<stage1>" placeholders.

Failures: workers checkpoint every `checkpoint.every_n_steps` steps; a dead worker makes Ray Train restart
the worker group (`FailureConfig.max_failures`), which resumes from the latest checkpoint and logs into
the same MLflow run (`pipelines.training.worker`). The run name and storage path are derived from the
config, so re-running the same config after the driver died makes Ray Train restore the latest
checkpoint of that run (a finished one: nothing is trained again).

CPU and GPU run the same code: on CPU, DS_ACCELERATOR=cpu and gloo; on GPU, NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.recipes import STAGE0_OUTPUT, STAGE1_OUTPUT, TrainConfig
from pipelines.training.model_config import model_config
from pipelines.training.model_setup import check_zero3
from pipelines.training.schedule import total_steps
from pipelines.training.worker import HF_DIR, PROJECTOR_DIR, STATE_FILE, train_func

PROGRESS_DIR = "progress"  # per-rank heartbeat files (pid, step), for monitoring and the failure test


@dataclass
class StageResult:
    """What a finished (or skipped) stage produced."""

    recipe: str
    stage: int
    run_name: str
    run_id: str | None  # MLflow run
    model_dir: str | None  # save_pretrained directory (tokenizer and processor included)
    projector_dir: str | None  # holds multi_modal_projector.safetensors
    steps: int  # optimizer steps done
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged values
    storage_path: str | None = None  # Ray Train run folder (checkpoints)
    seconds: float = 0.0
    status: str = "trained"  # "trained" | "skipped" (stage 1 with an existing projector given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_stage(cfg: TrainConfig) -> None:
    """Refuse, before Ray starts, a config `run_stage` cannot train: an unresolved "<stage0>" / "<stage1>"
    placeholder, no shards, or a path that does not exist (ValueError / FileNotFoundError naming the field)."""
    for name, value in (("model.path", cfg.model.path), ("model.projector_path", cfg.model.projector_path)):
        if value == STAGE1_OUTPUT:
            raise ValueError(f"{name}: {STAGE1_OUTPUT!r} stands for stage 1's output; run both stages "
                             "(`dpn train --recipe NAME`) or set it to a directory")
    for name in ("vision_path", "llm_path"):
        if getattr(cfg.model, name) == STAGE0_OUTPUT:
            raise ValueError(f"model.{name}: {STAGE0_OUTPUT!r} stands for stage 0's output; run the recipe "
                             "(`dpn train --recipe NAME`, which runs stage 0 first) or set it to a directory")
    if not cfg.data.shards:
        raise ValueError("data.shards: a stage trains on preprocessed shards; run the recipe with `dpn train "
                         "--recipe NAME` (which preprocesses its data first) or give --set data.shards=DIR")
    cfg.check_paths()


def run_stage(
    cfg: TrainConfig,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike | None = None,
    storage_dir: str | os.PathLike | None = None,
) -> StageResult:
    """Train one stage with Ray Train + DeepSpeed and return what it produced.

    Args:
        cfg: the stage config; `check_stage` must accept it (checked here before Ray starts).
        run_id: log into this existing MLflow run (e.g. the pipeline step's run); otherwise the run is
            found by the config's run name (resumed) or created, as a child of `parent_run_id`
            (default $DPN_PARENT_RUN_ID).
        tracking_uri: see `pipelines.tracking.resolve_tracking_uri` (None: $MLFLOW_TRACKING_URI, else
            the SQLite store under `cfg.work_dir`).
        out_dir: where the model (`model/`) and projector (`projector/`) are published; default
            <work_dir>/train/<run name>.
        storage_dir: Ray Train storage root (checkpoints); default <work_dir>/ray. Re-running with the same
            config and storage resumes from the latest checkpoint.
    Returns:
        StageResult; a stage 1 whose `model.projector_path` exists returns status "skipped".
    """
    t0 = time.time()
    name = cfg.resolved_run_name()
    work_dir = Path(cfg.work_dir).absolute()
    if cfg.stage == 1 and cfg.model.projector_path and Path(cfg.model.projector_path).exists():
        return StageResult(cfg.recipe, 1, name, None, None, str(Path(cfg.model.projector_path).absolute()), 0, 0,
                           status="skipped")
    check_stage(cfg)
    from dpn.tokenizer import load_tokenizer
    from pipelines.data.loader import open_shards

    info = open_shards(cfg.data.shards)
    check_zero3(cfg, model_config(cfg, load_tokenizer(cfg.data.tokenizer)))
    steps = total_steps(cfg, info.rows)
    storage = Path(storage_dir).absolute() if storage_dir else work_dir / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(tracking_uri, work_dir)
    tracker = tracking.RunTracker.open(
        tracking_uri=uri, work_dir=work_dir, experiment=cfg.tracking.experiment, run_name=name,
        run_id=run_id, run_key=None if run_id else name, parent_run_id=tracking.resolve_parent_run_id(parent_run_id),
        tags={"dpn.stage": cfg.stage, "dpn.recipe": cfg.recipe, "dpn.run_name": name},
    )
    tracker.log_params({**tracking.flatten_params(cfg), "derived.total_steps": str(steps),
                        "derived.grad_accum_steps": str(cfg.grad_accum_steps),
                        "derived.train_rows": str(info.rows), "derived.fingerprint": cfg.fingerprint()})
    tracker.log_dict(cfg.to_dict(), "config/train.json")
    tracker.log_dataset(info.manifest, name=f"{cfg.recipe}-stage{cfg.stage}-{cfg.data.template}",
                        source=info.path, context="training")
    try:
        result = _fit(cfg, info, steps, storage, tracker.run_id, uri)
    except Exception:
        tracker.finish("FAILED")
        raise
    out = Path(out_dir).absolute() if out_dir else work_dir / "train" / name
    final_state = _publish(result.checkpoint, out, f"stage {cfg.stage} ({name})")
    return StageResult(
        recipe=cfg.recipe, stage=cfg.stage, run_name=name, run_id=tracker.run_id, model_dir=str(out / HF_DIR),
        projector_dir=str(out / PROJECTOR_DIR), steps=int(final_state["step"]), total_steps=steps,
        metrics={k: float(v) for k, v in final_state.get("metrics", {}).items()},
        storage_path=str(storage / name), seconds=time.time() - t0,
    )


def _fit(cfg: TrainConfig, info, steps: int, storage: Path, run_id: str | None, tracking_uri: str):
    """`TorchTrainer.fit` of the stage (workers log into `run_id`); returns the Ray Train result, which
    must hold a final checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data.loader import read_shards

    if not ray.is_initialized():
        ray.init()
    name = cfg.resolved_run_name()
    # Only the columns the batches need; Ray Train splits the stream among the workers.
    train_ds = read_shards(info, columns=["index", "modality", "length", "input_ids", "labels", info.image_column])
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "train": cfg.to_dict(), "tokenizer": cfg.data.tokenizer, "shards": info.path, "total_steps": steps,
            "run_id": run_id, "tracking_uri": tracking_uri, "progress_dir": str(storage / name / PROGRESS_DIR),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.stage} ({name}) ended without a final checkpoint")
    return result


def _publish(checkpoint, out: Path, what: str) -> dict[str, Any]:
    """Copy the final checkpoint's model and projector into `out`; returns its training state."""
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        final_state = json.loads((Path(d) / STATE_FILE).read_text())
        if not final_state.get("done"):
            raise RuntimeError(f"{what}: the last checkpoint is not final ({final_state})")
        for sub in (HF_DIR, PROJECTOR_DIR):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
            shutil.copytree(Path(d) / sub, out / sub)
    return final_state


__all__ = ["PROGRESS_DIR", "StageResult", "check_stage", "run_stage"]
