"""What each step of the pipeline DAG does (`pipelines.workflow` wires them): read the step's inputs from
its `StepContext`, call the data, training, evaluation or registry code, and return the step's outputs
(JSON, paths relative to the step's directory, which is renamed when it is published).

Every function is named after its step and takes what it needs explicitly; none of them caches anything
itself: the DAG does (`pipelines.dag`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines import registry, tracking
from pipelines.dag import StepContext
from pipelines.data.sources import CorpusConfig, corpus_paths
from pipelines.recipes import TrainConfig, chain_stage2
from pipelines.training.route_calibration import CalibrationSpec

# A stage's config from the pipeline's recipe and overrides, plus step-specific `key=value` overrides.
StageConfig = Callable[[Sequence[str]], TrainConfig]


def _rel(ctx: StepContext, path: str | Path) -> str:
    """Outputs name files relative to the step's directory: it is renamed when published."""
    return str(Path(path).absolute().relative_to(ctx.out_dir.absolute()))


def _input_path(ctx: StepContext, step: str, key: str) -> Path:
    r = ctx.inputs[step]
    return r.out_dir / r.outputs[key]  # an absolute output (given shards) stays what it is


def _corpus(ctx: StepContext, corpus: CorpusConfig) -> dict[str, Path | None]:
    return corpus_paths(corpus, _input_path(ctx, "synth", "corpus") if corpus.synthetic else None)


def _reading(shards: Path, tokenizer: str) -> list[str]:
    """Overrides that make a stage read `shards` (and no other data source)."""
    return ["data.synthetic=false", "data.annotations=none", "data.image_root=none", f"data.shards={shards}",
            f"data.tokenizer={tokenizer}"]


def synth(ctx: StepContext, corpus: CorpusConfig) -> dict[str, Any]:
    """Generate the synthetic corpus (`dpn synth`) into the step's directory."""
    from pipelines.data.synth.corpus import generate_corpus

    summary = generate_corpus(ctx.out_dir / "corpus", seed=corpus.seed, n_pretrain=corpus.n_pretrain,
                              n_instruct=corpus.n_instruct, n_eval=corpus.n_eval, n_calibration=corpus.n_calibration)
    return {"corpus": "corpus", "summary": {k: v for k, v in summary.items() if k != "out_dir"}}


def preprocess(ctx: StepContext, corpus: CorpusConfig, split: str, stage: TrainConfig, geometry: TrainConfig,
               router: bool) -> dict[str, Any]:
    """Preprocess the corpus' `split` with the template and length limit of `stage`'s config, for the
    image size and visual tokens of `geometry`'s model (stage 1's: both stages share it)."""
    from dpn.tokenizer import load_tokenizer
    from pipelines.data.preprocess import PreprocessConfig
    from pipelines.data.preprocess import preprocess as run_preprocess
    from pipelines.training.model_config import model_config

    paths = _corpus(ctx, corpus)
    mcfg = model_config(geometry, load_tokenizer(paths["tokenizer"]))
    summary = run_preprocess(PreprocessConfig(
        annotations=str(paths[split]), image_root=str(paths["images"]), tokenizer=str(paths["tokenizer"]),
        template=stage.data.template, out=str(ctx.out_dir / "shards"), image_size=mcfg.vision_config.image_size,
        num_image_tokens=mcfg.num_image_tokens, add_router_token=router, max_length=stage.data.max_length,
        follow_symlinks_outside_root=corpus.follow_symlinks_outside_root,
    ))
    if summary.rows_out == 0:
        raise ValueError(f"preprocessing {paths[split]} left no valid record (quarantined: {summary.quarantined})")
    return {"shards": _rel(ctx, summary.path), "tokenizer": str(paths["tokenizer"].absolute()),
            "rows_in": summary.rows_in, "rows_out": summary.rows_out, "quarantined": summary.quarantined,
            "fingerprint": summary.fingerprint}


def given_shards(ctx: StepContext, shards: str, tokenizer: str) -> dict[str, Any]:
    """Shards `dpn preprocess` wrote, read as they are (nothing is copied): the data step of a split given
    as shards."""
    from pipelines.data.loader import open_shards

    info = open_shards(shards)
    return {"shards": str(Path(info.path).absolute()), "tokenizer": str(Path(tokenizer).absolute()),
            "rows_in": info.rows, "rows_out": info.rows, "quarantined": {}, "fingerprint": info.manifest["fingerprint"]}


def stage0(ctx: StepContext, part: str, corpus: CorpusConfig, stage1: TrainConfig, tracking_uri: str) -> dict[str, Any]:
    """Pre-train the tiny recipe's random vision tower ("vision": needs no corpus, so it runs beside synth
    and preprocessing) or LLM ("llm": needs the corpus tokenizer only) as a one-CPU Ray task."""
    from pipelines.training.stage0.common import log_stage0

    if part == "vision":
        from pipelines.training.stage0.vision import pretrain_vision_on_ray

        summary = pretrain_vision_on_ray(stage1.vision_pretrain, stage1.model.preset, ctx.out_dir / "vision_tower")
        out = "vision_tower"
    else:
        from pipelines.training.stage0.llm import pretrain_llm_on_ray

        summary = pretrain_llm_on_ray(stage1.llm_pretrain, stage1.model.preset, _corpus(ctx, corpus)["tokenizer"],
                                      ctx.out_dir / "llm")
        out = "llm"
    log_stage0(part, summary, stage1, run_id=ctx.run_id, tracking_uri=tracking_uri)
    return {out: out, "summary": {k: v for k, v in summary.items() if k != "evals"}}


def _train(ctx: StepContext, stage: TrainConfig, out: str, tracking_uri: str) -> dict[str, Any]:
    """Train `stage` into the step's directory (checkpoints in its scratch, which survives failed
    attempts: a re-run resumes) and return the step's outputs, the config trained included."""
    from pipelines.training.driver import run_stage

    res = run_stage(stage, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id, tracking_uri=tracking_uri,
                    out_dir=ctx.out_dir / out, storage_dir=ctx.scratch_dir / "ray")
    trained = res.status == "trained"  # else stage 1 was skipped: the given projector, absolute
    return {"model_dir": _rel(ctx, res.model_dir) if trained else None,
            "projector_dir": _rel(ctx, res.projector_dir) if trained else res.projector_dir,
            "steps": res.steps, "metrics": res.metrics, "status": res.status, "train_run_id": res.run_id,
            "config": stage.to_dict()}


def stage1(ctx: StepContext, stage_config: StageConfig, tracking_uri: str) -> dict[str, Any]:
    """Stage 1 on the preprocess_pretrain shards, from stage 0's tower / LLM where the recipe reads them."""
    data = ctx.inputs["preprocess_pretrain"]
    extra = _reading(_input_path(ctx, "preprocess_pretrain", "shards"), data.outputs["tokenizer"])
    if "stage0_vision" in ctx.inputs:
        extra.append(f"model.vision_path={_input_path(ctx, 'stage0_vision', 'vision_tower')}")
    if "stage0_llm" in ctx.inputs:
        extra.append(f"model.llm_path={_input_path(ctx, 'stage0_llm', 'llm')}")
    return _train(ctx, stage_config(extra), "stage1", tracking_uri)


def stage2(ctx: StepContext, stage_config: StageConfig, variant: str, data_step: str, tracking_uri: str
           ) -> dict[str, Any]:
    """Stage 2 of `variant` (a compressor) on `data_step`'s shards, from stage 1's outputs where the recipe
    reads them ("<stage1>")."""
    data = ctx.inputs[data_step]
    stage = stage_config([*_reading(_input_path(ctx, data_step, "shards"), data.outputs["tokenizer"]),
                          f"model.compressor={variant}", f"data.add_router_token={variant == 'dpn'}"])
    if "stage1" in ctx.inputs:
        model_dir = ctx.inputs["stage1"].outputs["model_dir"]
        stage = chain_stage2(stage, model_dir and str(_input_path(ctx, "stage1", "model_dir")),
                             str(_input_path(ctx, "stage1", "projector_dir")))
    return {**_train(ctx, stage, "stage2", tracking_uri), "compressor": variant}


def route_calibrate(ctx: StepContext, spec: CalibrationSpec, use_gpu: bool, tracking_uri: str) -> dict[str, Any]:
    """Fit the dpn model's routers (counterfactual objective) and its budget curve on the held-out
    calibration shards, set `routing.budget`; the calibrated model is what is evaluated and registered."""
    from pipelines.training.route_calibration import calibrate_on_ray

    model_dir = _input_path(ctx, "stage2_dpn", "model_dir")
    shards = _input_path(ctx, "preprocess_calibration", "shards")
    out = ctx.out_dir / "model"
    report = calibrate_on_ray(str(model_dir), str(shards), spec, str(out), use_gpu=use_gpu)
    run = tracking.RunTracker.open(tracking_uri=tracking_uri, run_id=ctx.run_id)
    fit = report.get("fit") or {}
    run.log_metrics({k: float(v) for k, v in {
        "routing/calibration_samples": report["samples"],
        "routing/route_bias": report["route_bias"],
        "routing/budget_fraction": report["budget"],
        "routing/reachable_min_fraction": report["reachable"][0],
        "routing/fit_val_agreement_pct": fit.get("val_agreement_pct"),
        "routing/fit_compute_price": fit.get("mu"),
        "time/calibration_pass_s": report["pass_seconds"],
    }.items() if v is not None}, step=0)
    run.log_dict(report, "routing/calibration.json")
    run.log_model_dir(out, artifact_path="model")
    return {"model_dir": _rel(ctx, out), "report": {k: v for k, v in report.items() if k != "curve"},
            "calibrate_run_id": ctx.run_id}


def _eval_model_dir(ctx: StepContext, variant: str) -> Path:
    # The dpn variant is evaluated (and registered) as calibrated: fitted routers, budget set.
    if variant == "dpn" and "route_calibrate" in ctx.inputs:
        return _input_path(ctx, "route_calibrate", "model_dir")
    return _input_path(ctx, f"stage2_{variant}", "model_dir")


def evaluate(ctx: StepContext, corpus: CorpusConfig, variants: Sequence[str], benchmarks: Sequence[str],
             limit: int | None, work_dir: str, experiment: str) -> dict[str, Any]:
    """Evaluate every variant's model on the benchmarks (`pipelines.evaluation`), one MLflow child run per
    model under the step's run; returns per compressor its accuracy, FLOPs, saving and routing."""
    from pipelines.evaluation.config import EvalConfig, EvalTarget
    from pipelines.evaluation.report import routing_summary
    from pipelines.evaluation.run import TrackingOptions, run_evaluation

    targets = [EvalTarget(name=v, model_dir=str(_eval_model_dir(ctx, v))) for v in variants]
    # Shards go to scratch (kept across failed attempts: a re-run resumes them), results are then published.
    scratch = ctx.scratch_dir / "eval"
    summary = run_evaluation(
        EvalConfig(targets=targets, benchmarks=list(benchmarks), data_root=str(_corpus(ctx, corpus)["eval"]),
                   out_dir=str(scratch), limit=limit),
        tracking=TrackingOptions(work_dir=work_dir, experiment=experiment, parent_run_id=ctx.run_id),
    )
    shutil.copytree(scratch, ctx.out_dir / "eval")
    keys = ("accuracy", "accuracy_by_difficulty", "prefill_tflops_per_sample", "saving_vs_none_pct",
            "saving_vs_uncompressed_pct", "path_shares")
    results = {row["compressor"]: {**{k: row[k] for k in keys}, "routing": routing_summary(row),
                                   "mlflow_run_id": row["mlflow_run_id"]} for row in summary["rows"]}
    return {"summary": "eval/summary.json", "results": results}


def register(ctx: StepContext, variant: str, model_name: str, gate_metric: str, tracking_uri: str
             ) -> dict[str, Any]:
    """Register `variant`'s model as `challenger`; promote it to `champion` if it wins the gate
    (`pipelines.registry`); the decision, its reason and both scores go on the step's run."""
    results = ctx.inputs["evaluate"].outputs["results"]
    if variant == "dpn" and "route_calibrate" in ctx.inputs:
        source_run = ctx.inputs["route_calibrate"].outputs["calibrate_run_id"]
    else:
        source_run = ctx.inputs[f"stage2_{variant}"].outputs["train_run_id"]
    challenger = {"score": registry.gate_score(results, variant, gate_metric),
                  "tflops": float(results[variant]["prefill_tflops_per_sample"])}
    gate = registry.register_and_gate(source_run, model_name, challenger, gate_metric=gate_metric,
                                      compressor=variant, tracking_uri=tracking_uri,
                                      model_dir=str(_eval_model_dir(ctx, variant)), tmp_dir=str(ctx.scratch_dir))
    champion = gate["champion"]
    run = tracking.RunTracker.open(tracking_uri=tracking_uri, run_id=ctx.run_id)
    run.log_metrics({"registry/challenger_score": challenger["score"],
                     "registry/challenger_tflops_per_sample": challenger["tflops"],
                     **({"registry/champion_score": champion["score"],
                         "registry/champion_tflops_per_sample": champion["tflops"]} if champion else {})}, step=0)
    run.set_tags({"registry.decision": "promoted" if gate["promoted"] else "kept_champion",
                  "registry.reason": gate["reason"], "registry.version": gate["version"]})
    return {"model": model_name, "version": gate["version"], "promoted": gate["promoted"],
            "reason": gate["reason"], "challenger": challenger, "champion": champion}
