"""The DPN pipeline as a workflow DAG:

    stage0_vision ──────────────────────┐
           ┌─ stage0_llm ───────────────┤
    synth ─┼─ preprocess_pretrain ── stage1 ──┬─ stage2_dpn ────┐
           └─ preprocess_instruct ────────────┼─ stage2_static ─┼─ evaluate ── register
                                              └─ stage2_none ───┘

(`synth`, `stage0_vision` and `stage0_llm`, the tiny recipe's pre-training of its vision tower and LLM,
only for the embedded default; real corpora enter the preprocess steps directly and real recipes start
from CLIP and Vicuna.) Every step
is cached by fingerprint (`pipelines.dag`), tracked as a child MLflow run of one parent run per
pipeline execution (`pipelines.tracking`), and resumable after a crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpn.compressors import COMPRESSORS
from pipelines import tracking
from pipelines.dag import Pipeline, RunHooks, Step, StepContext, StepResult
from pipelines.recipes import STAGE0_OUTPUT
from pipelines.route_calibration import CalibrationSpec

VARIANTS = COMPRESSORS
TRIGGERS = ("manual", "scheduled")


@dataclass(kw_only=True)
class CorpusConfig:
    """Where the data comes from.

    Args:
        synthetic: generate the embedded synthetic corpus (`dpn synth`) instead of reading real corpora.
        seed / n_pretrain / n_instruct / n_eval: synthetic corpus size and seed.
        pretrain_annotations / instruct_annotations: LLaVA JSON files (LCS-558K, mix665K) when not synthetic.
        image_root: directory the annotations' `image` paths are relative to.
        tokenizer: tokenizer directory (the LLM's, with `<image>`/`<ROUTER>` added) when not synthetic.
        eval_root: directory holding the benchmarks' question files (LLaVA eval layout).
        n_calibration: synthetic held-out records the routers are fitted and the budget calibrated on.
        calibration_annotations: held-out LLaVA JSON (mix665K schema) for the same, when not synthetic;
            None: the instruct annotations themselves (samples the model trained on: the budget still
            transfers, the counterfactual targets are then measured on seen samples).
    """

    synthetic: bool = True
    seed: int = 0
    n_pretrain: int = 2000
    n_instruct: int = 2000
    n_eval: int = 300
    n_calibration: int = 256
    pretrain_annotations: str | None = None
    instruct_annotations: str | None = None
    image_root: str | None = None
    tokenizer: str | None = None
    eval_root: str | None = None
    calibration_annotations: str | None = None

    def __post_init__(self) -> None:
        if self.calibration_annotations is not None and not Path(self.calibration_annotations).is_file():
            raise ValueError(f"corpus.calibration_annotations: {self.calibration_annotations!r} is not a file")
        if self.synthetic:
            for name in ("n_pretrain", "n_instruct", "n_eval"):
                if getattr(self, name) < 1:
                    raise ValueError(f"corpus.{name} must be >= 1, got {getattr(self, name)}")
        else:
            for name in ("pretrain_annotations", "instruct_annotations", "image_root", "tokenizer", "eval_root"):
                if not getattr(self, name):
                    raise ValueError(f"corpus.{name} is required when corpus.synthetic is false")
            for name in ("pretrain_annotations", "instruct_annotations"):
                if not Path(getattr(self, name)).is_file():
                    raise ValueError(f"corpus.{name}: {getattr(self, name)!r} is not a file")
            for name in ("image_root", "tokenizer", "eval_root"):
                if not Path(getattr(self, name)).is_dir():
                    raise ValueError(f"corpus.{name}: {getattr(self, name)!r} is not a directory")


@dataclass(kw_only=True)
class PipelineConfig:
    """A whole pipeline: corpus, training recipe, the stage-2 variants to compare, evaluation, registry.

    Args:
        name: recipe name (tag on the parent run).
        work_dir: outputs, caches, scratch state and (by default) the SQLite MLflow store.
        corpus: see `CorpusConfig`.
        train_recipe: a training recipe name from `pipelines.recipes` (shared by stage 1 and stage 2).
        train_overrides: `key=value` overrides applied to the training recipe (its `--set` syntax).
        variants: stage-2 compressors to train and compare; the first is the one registered.
        benchmarks: evaluation benchmarks (names of `dpn.eval.benchmarks.BENCHMARKS`).
        eval_limit: evaluate only the first N questions of each benchmark (None = all).
        registered_model: MLflow registered-model name.
        gate_metric: metric key of the evaluation results compared for promotion (higher is better).
        max_cpus: CPUs the DAG may occupy at once (concurrent steps must fit).
        experiment: MLflow experiment name.
        routing: the `route_calibrate` step of the dpn variant: budget, calibration samples, router fit
            (`pipelines.route_calibration.CalibrationSpec`).
    """

    name: str
    work_dir: str = ".dpn_work"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train_recipe: str = "tiny"
    train_overrides: dict[str, Any] = field(default_factory=dict)
    variants: list[str] = field(default_factory=lambda: ["dpn", "static", "none"])
    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    eval_limit: int | None = None
    registered_model: str = "dpn"
    gate_metric: str = "synthetic/accuracy"
    max_cpus: float = 2.0
    experiment: str = "dpn"
    routing: CalibrationSpec = field(default_factory=CalibrationSpec)

    def __post_init__(self) -> None:
        # Absolute: Ray workers run in their own working directories.
        self.work_dir = str(Path(self.work_dir).absolute())
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        if isinstance(self.routing, dict):
            self.routing = CalibrationSpec(**self.routing)
        if not self.variants:
            raise ValueError("variants must name at least one stage-2 compressor")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"variants must be among {VARIANTS}, got {bad}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {self.variants}")
        if not self.benchmarks:
            raise ValueError("benchmarks must name at least one benchmark")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or None, got {self.eval_limit}")
        if self.max_cpus <= 0:
            raise ValueError(f"max_cpus must be > 0, got {self.max_cpus}")
        if self.routing.budget is not None and "dpn" in self.variants:
            from dpn.presets import get_preset
            from dpn.routing import flops_floor

            floor = flops_floor(get_preset(_stage_config(self, 2, []).model.preset))
            if self.routing.budget < floor:
                raise ValueError(
                    f"routing.budget {self.routing.budget:g} is below what any routing path reaches: at least "
                    f"{floor:.3f} of the uncompressed prefill FLOPs on this geometry (route_calibrate reports "
                    "the range measured on the calibration data)")

    def section(self, *names: str) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {n: d[n] for n in names}


# ----- named pipeline recipes --------------------------------------------------------------------
def tiny_pipeline(**overrides: Any) -> PipelineConfig:
    """The embedded default (`make demo`): synthetic corpus, tiny models, CPU, minutes on 2 cores.

    Sized by what the tiny model needs to answer far above chance and a demo of ~12 minutes on 2 cores:
    the two stage-0 tasks (tower ~6 min, LLM ~4 min) side by side, then stage 2 on 9,600 instruct
    records (600 steps of 16, ~5 min; bench/RESULTS_learnability.md, round 8). Each stage trains on one Ray worker,
    so the two stage-2 variants (DPN and the uncompressed baseline) run side by side, one core each: on
    this machine that is faster than one after the other on two DeepSpeed workers each (measured with
    the 8-layer LLM: 0.77-0.83 core-s per step against 0.9-0.96, and the start-up overlaps).
    Add "static" (`variants: [dpn, static, none]` in a config
    file) for the static-pyramid ablation, a few minutes more."""
    overrides.setdefault("corpus", CorpusConfig(n_pretrain=512, n_instruct=9600, n_eval=300))
    overrides.setdefault("variants", ["dpn", "none"])
    # Merged, not replaced: a config file's own train_overrides keep the one-worker default unless they set it.
    overrides["train_overrides"] = {"scaling.num_workers": 1, **overrides.get("train_overrides", {})}
    # setdefault: a config file may rename the pipeline or swap the training recipe.
    overrides.setdefault("name", "tiny")
    overrides.setdefault("train_recipe", "tiny")
    return PipelineConfig(**overrides)


def llava_1_5_7b_pipeline(**overrides: Any) -> PipelineConfig:
    """LLaVA-1.5-7B with DPN on the real corpora: give `corpus` paths in a config file."""
    overrides.setdefault("benchmarks", ["vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmbench", "seed"])
    overrides.setdefault("gate_metric", "gqa/accuracy")
    overrides.setdefault("max_cpus", 64.0)
    for key, value in (("name", "llava-1.5-7b"), ("train_recipe", "llava-1.5-7b"), ("registered_model", "dpn-llava-1.5-7b")):
        overrides.setdefault(key, value)
    return PipelineConfig(**overrides)


def _named(name: str, base: Callable[..., PipelineConfig]) -> Callable[..., PipelineConfig]:
    """Pipeline recipe `name`: `base`'s, training the recipe of the same name (LLaVA-HR, `pipelines.recipes`)."""
    def make(**overrides: Any) -> PipelineConfig:
        for key, value in (("name", name), ("train_recipe", name), ("registered_model", f"dpn-{name}")):
            overrides.setdefault(key, value)
        return base(**overrides)

    return make


PIPELINE_RECIPES: dict[str, Callable[..., PipelineConfig]] = {
    "tiny": tiny_pipeline,
    "llava-1.5-7b": llava_1_5_7b_pipeline,
    "llava-hr-tiny": _named("llava-hr-tiny", tiny_pipeline),
    "llava-hr-7b": _named("llava-hr-7b", llava_1_5_7b_pipeline),
    "llava-hr-x-13b": _named("llava-hr-x-13b", llava_1_5_7b_pipeline),
}


def load_pipeline_config(recipe: str | None, config_file: str | None) -> PipelineConfig:
    """A named recipe, optionally overridden by a YAML/JSON file (a thin override, per the style guide)."""
    overrides: dict[str, Any] = {}
    if config_file:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"pipeline config file {config_file!r} does not exist")
        overrides = yaml.safe_load(path.read_text()) or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{config_file}: expected a mapping of PipelineConfig fields, got {type(overrides).__name__}")
        recipe = overrides.pop("recipe", recipe)
        known = {f.name for f in dataclasses.fields(PipelineConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown pipeline field(s) {unknown}; valid: {sorted(known)}")
    recipe = recipe or "tiny"
    if recipe not in PIPELINE_RECIPES:
        raise ValueError(f"unknown pipeline recipe {recipe!r}; choose one of {sorted(PIPELINE_RECIPES)}")
    return PIPELINE_RECIPES[recipe](**overrides)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----- tracking hooks ----------------------------------------------------------------------------
class MlflowHooks(RunHooks):
    """One parent run per pipeline execution, one child run per executed step (resumed, never duplicated,
    after a crash); cache hits are recorded on the parent with the run that produced them."""

    def __init__(self, cfg: PipelineConfig, trigger: str, tracking_uri: str):
        self.cfg, self.trigger, self.uri = cfg, trigger, tracking_uri
        self.parent: tracking.RunTracker | None = None
        self.steps: dict[str, tracking.RunTracker] = {}

    def start_pipeline(self, pipeline_fp: str, resume_run_id: str | None) -> str | None:
        tags = {"dpn.recipe": self.cfg.name, "dpn.fingerprint": pipeline_fp, "dpn.git_sha": git_sha(),
                "dpn.trigger": self.trigger, "dpn.kind": "pipeline"}
        self.parent = tracking.RunTracker.open(tracking_uri=self.uri, work_dir=self.cfg.work_dir,
                                               experiment=self.cfg.experiment, run_id=resume_run_id,
                                               run_name=f"pipeline-{self.cfg.name}", tags=tags)
        if not self.parent.resumed:
            self.parent.log_params(dataclasses.asdict(self.cfg))
        return self.parent.run_id

    def start_step(self, step: Step, fp: str, parent_run_id: str | None, resume_run_id: str | None) -> str | None:
        run = tracking.RunTracker.open(tracking_uri=self.uri, work_dir=self.cfg.work_dir,
                                       experiment=self.cfg.experiment, run_id=resume_run_id,
                                       run_name=step.name, parent_run_id=parent_run_id,
                                       tags={"dpn.step": step.name, "dpn.fingerprint": fp, "dpn.kind": "step"})
        self.steps[step.name] = run
        return run.run_id

    def end_step(self, step: Step, result: StepResult) -> None:
        run = self.steps.pop(step.name, None)
        if run is None:
            return
        run.set_tags({"dpn.status": result.status})
        run.log_metrics({"step/seconds": result.seconds}, step=0)
        run.finish("FINISHED" if result.status == "ran" else "FAILED")

    def cached_step(self, step: Step, result: StepResult, parent_run_id: str | None) -> None:
        if self.parent is not None:
            self.parent.set_tags({f"dpn.cached.{step.name}": result.run_id or "unknown"})

    def end_pipeline(self, parent_run_id: str | None, status: str, results: list[StepResult]) -> None:
        if self.parent is None:
            return
        self.parent.log_dict([dataclasses.asdict(r) | {"out_dir": str(r.out_dir)} for r in results], "steps.json")
        self.parent.finish("FINISHED" if status == "succeeded" else "FAILED")


# ----- steps -------------------------------------------------------------------------------------
def _rel(ctx: StepContext, path: str | Path) -> str:
    """Outputs name files relative to the step's directory: it is renamed when published."""
    return str(Path(path).absolute().relative_to(ctx.out_dir.absolute()))


def _input_path(ctx: StepContext, step: str, key: str) -> Path:
    r = ctx.inputs[step]
    return r.out_dir / r.outputs[key]


def _corpus_paths(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Path]:
    """Annotations, image root, tokenizer and eval root: from the synth step, or the configured corpora."""
    if cfg.corpus.synthetic:
        root = _input_path(ctx, "synth", "corpus")
        return {"pretrain": root / "pretrain.json", "instruct": root / "instruct.json", "images": root / "images",
                "tokenizer": root / "tokenizer", "eval": root / "eval", "calibration": root / "calibration.json"}
    c = cfg.corpus
    return {"pretrain": Path(c.pretrain_annotations), "instruct": Path(c.instruct_annotations),
            "images": Path(c.image_root), "tokenizer": Path(c.tokenizer), "eval": Path(c.eval_root),
            "calibration": Path(c.calibration_annotations or c.instruct_annotations)}


def _stage_config(cfg: PipelineConfig, stage: int, extra: list[str]):
    from pipelines.recipes import get_recipe

    overrides = [f"{k}={v}" for k, v in cfg.train_overrides.items()] + [f"work_dir={Path(cfg.work_dir).absolute()}"]
    return get_recipe(cfg.train_recipe, stage, overrides + extra)


def step_synth(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    from pipelines.synth import generate_corpus

    c = cfg.corpus
    summary = generate_corpus(ctx.out_dir / "corpus", seed=c.seed, n_pretrain=c.n_pretrain,
                              n_instruct=c.n_instruct, n_eval=c.n_eval, n_calibration=c.n_calibration)
    return {"corpus": "corpus", "summary": {k: v for k, v in summary.items() if k != "out_dir"}}


def step_preprocess(cfg: PipelineConfig, ctx: StepContext, split: str, template: str, router: bool) -> dict[str, Any]:
    from dpn.tokenizer import load_tokenizer
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.train import model_config

    paths = _corpus_paths(cfg, ctx)
    mcfg = model_config(_stage_config(cfg, 1, []), load_tokenizer(paths["tokenizer"]))
    summary = preprocess(PreprocessConfig(
        annotations=str(paths[split]), image_root=str(paths["images"]), tokenizer=str(paths["tokenizer"]),
        template=template, out=str(ctx.out_dir / "shards"), image_size=mcfg.vision_config.image_size,
        num_image_tokens=mcfg.num_image_tokens, add_router_token=router,
    ))
    if summary.rows_out == 0:
        raise ValueError(f"preprocessing {paths[split]} left no valid record (quarantined: {summary.quarantined})")
    return {"shards": _rel(ctx, summary.path), "tokenizer": str(paths["tokenizer"].absolute()),
            "rows_in": summary.rows_in, "rows_out": summary.rows_out, "quarantined": summary.quarantined,
            "fingerprint": summary.fingerprint}


def step_stage0(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    """Pre-train the random vision tower (`pipelines.vision_pretrain`); needs no corpus, so it runs beside
    synth and preprocessing."""
    from pipelines.train import log_stage0
    from pipelines.vision_pretrain import pretrain_vision_on_ray

    stage1 = _stage_config(cfg, 1, [])
    summary = pretrain_vision_on_ray(stage1.vision_pretrain, stage1.model.preset, ctx.out_dir / "vision_tower")
    log_stage0("vision", summary, stage1, run_id=ctx.run_id)
    return {"vision_tower": "vision_tower", "summary": {k: v for k, v in summary.items() if k != "evals"}}


def step_stage0_llm(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    """Pre-train the random LLM on the corpus' questions with scenes as text (`pipelines.llm_pretrain`);
    needs the corpus tokenizer only, so it runs beside preprocessing and the vision stage 0."""
    from pipelines.llm_pretrain import pretrain_llm_on_ray
    from pipelines.train import log_stage0

    stage1 = _stage_config(cfg, 1, [])
    summary = pretrain_llm_on_ray(stage1.llm_pretrain, stage1.model.preset, _corpus_paths(cfg, ctx)["tokenizer"],
                                  ctx.out_dir / "llm")
    log_stage0("llm", summary, stage1, run_id=ctx.run_id)
    return {"llm": "llm", "summary": {k: v for k, v in summary.items() if k != "evals"}}


def step_stage1(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    from pipelines.train import run_stage

    data = ctx.inputs["preprocess_pretrain"]
    stage0 = [f"model.vision_path={_input_path(ctx, 'stage0_vision', 'vision_tower')}"] if "stage0_vision" in ctx.inputs else []
    if "stage0_llm" in ctx.inputs:
        stage0.append(f"model.llm_path={_input_path(ctx, 'stage0_llm', 'llm')}")
    stage = _stage_config(cfg, 1, [f"data.shards={_input_path(ctx, 'preprocess_pretrain', 'shards')}",
                                   f"data.tokenizer={data.outputs['tokenizer']}", "data.synthetic=false", *stage0])
    res = run_stage(stage, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id, out_dir=ctx.out_dir / "stage1",
                    storage_dir=ctx.scratch_dir / "ray")
    return {"model_dir": _rel(ctx, res.model_dir), "projector_dir": _rel(ctx, res.projector_dir),
            "steps": res.steps, "metrics": res.metrics, "train_run_id": res.run_id}


def step_stage2(cfg: PipelineConfig, ctx: StepContext, variant: str, data_step: str) -> dict[str, Any]:
    from pipelines.train import StageResult, chain_stage2, run_stage

    s1 = ctx.inputs["stage1"]
    data = ctx.inputs[data_step]
    stage = _stage_config(cfg, 2, [f"data.shards={_input_path(ctx, data_step, 'shards')}",
                                   f"data.tokenizer={data.outputs['tokenizer']}", "data.synthetic=false",
                                   f"model.compressor={variant}", f"data.add_router_token={variant == 'dpn'}"])
    stage1 = StageResult(recipe=cfg.train_recipe, stage=1, run_name="stage1", run_id=s1.run_id,
                         model_dir=str(_input_path(ctx, "stage1", "model_dir")),
                         projector_dir=str(_input_path(ctx, "stage1", "projector_dir")), steps=0, total_steps=0)
    res = run_stage(chain_stage2(stage, stage1), run_id=ctx.run_id, parent_run_id=ctx.parent_run_id,
                    out_dir=ctx.out_dir / "stage2", storage_dir=ctx.scratch_dir / "ray")
    return {"model_dir": _rel(ctx, res.model_dir), "steps": res.steps, "metrics": res.metrics,
            "compressor": variant, "train_run_id": res.run_id}


def step_route_calibrate(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    """Fit the dpn model's routers (counterfactual objective) and its budget curve on the held-out
    calibration shards, set `routing.budget`; the calibrated model is what is evaluated and registered."""
    from pipelines.route_calibration import calibrate_on_ray

    model_dir = _input_path(ctx, "stage2_dpn", "model_dir")
    shards = _input_path(ctx, "preprocess_calibration", "shards")
    out = ctx.out_dir / "model"
    report = calibrate_on_ray(str(model_dir), str(shards), cfg.routing, str(out),
                              use_gpu=_stage_config(cfg, 2, []).scaling.use_gpu)
    run = tracking.RunTracker.open(tracking_uri=tracking.resolve_tracking_uri(None, cfg.work_dir), run_id=ctx.run_id)
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


def step_evaluate(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    from pipelines.evaluate import EvalConfig, EvalTarget, TrackingOptions, routing_summary, run_evaluation

    paths = _corpus_paths(cfg, ctx)
    targets = [EvalTarget(name=v, model_dir=str(_eval_model_dir(ctx, v))) for v in cfg.variants]
    # Shards go to scratch (kept across failed attempts: a re-run resumes them), results are then published.
    scratch = ctx.scratch_dir / "eval"
    summary = run_evaluation(
        EvalConfig(targets=targets, benchmarks=cfg.benchmarks, data_root=str(paths["eval"]), out_dir=str(scratch),
                   limit=cfg.eval_limit),
        tracking=TrackingOptions(work_dir=cfg.work_dir, experiment=cfg.experiment, parent_run_id=ctx.run_id),
    )
    import shutil

    shutil.copytree(scratch, ctx.out_dir / "eval")
    results = {}
    for row in summary["rows"]:
        results[row["compressor"]] = {
            "accuracy": row["accuracy"],
            "accuracy_by_difficulty": row["accuracy_by_difficulty"],
            "prefill_tflops_per_sample": row["prefill_tflops_per_sample"],
            "saving_vs_none_pct": row["saving_vs_none_pct"],
            "saving_vs_uncompressed_pct": row["saving_vs_uncompressed_pct"],
            "path_shares": row["path_shares"],
            "routing": routing_summary(row),
            "mlflow_run_id": row["mlflow_run_id"],
        }
    return {"summary": "eval/summary.json", "results": results}


def gate_score(results: dict[str, Any], variant: str, gate_metric: str) -> float:
    """The gate metric ("<benchmark>/<metric>") of a variant from the evaluate step's results."""
    bench, _, metric = gate_metric.partition("/")
    acc = results[variant]["accuracy"]
    if bench not in acc:
        raise ValueError(f"gate_metric {gate_metric!r}: benchmark {bench!r} was not evaluated ({sorted(acc)})")
    if metric not in ("accuracy", "primary", ""):
        raise ValueError(f"gate_metric {gate_metric!r}: only '<benchmark>/accuracy' (the primary metric) is gated")
    return float(acc[bench])


def promotion_decision(challenger: dict[str, float], champion: dict[str, float] | None) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger scores higher at no more FLOPs."""
    if champion is None:
        return True, "no champion yet"
    if challenger["score"] <= champion["score"]:
        return False, f"score {challenger['score']:.4g} does not beat the champion's {champion['score']:.4g}"
    if challenger["tflops"] > champion["tflops"] * (1 + 1e-9):
        return False, f"needs {challenger['tflops']:.4g} TFLOPs per sample > the champion's {champion['tflops']:.4g}"
    return True, f"score {challenger['score']:.4g} > {champion['score']:.4g} at {challenger['tflops']:.4g} <= " \
                 f"{champion['tflops']:.4g} TFLOPs"


def step_register(cfg: PipelineConfig, ctx: StepContext) -> dict[str, Any]:
    """Register the first variant's model as `challenger`; promote it to `champion` if it wins the gate."""
    variant = cfg.variants[0]
    results = ctx.inputs["evaluate"].outputs["results"]
    if variant == "dpn" and "route_calibrate" in ctx.inputs:
        source_run = ctx.inputs["route_calibrate"].outputs["calibrate_run_id"]
    else:
        source_run = ctx.inputs[f"stage2_{variant}"].outputs["train_run_id"]
    challenger = {"score": gate_score(results, variant, cfg.gate_metric),
                  "tflops": float(results[variant]["prefill_tflops_per_sample"])}
    uri = tracking.resolve_tracking_uri(None, cfg.work_dir)
    version = tracking.register_model(source_run, cfg.registered_model, artifact_path="model",
                                      tracking_uri=uri, tags={"gate_metric": cfg.gate_metric,
                                                              "gate_score": challenger["score"],
                                                              "tflops_per_sample": challenger["tflops"],
                                                              "compressor": variant})
    tracking.set_alias(cfg.registered_model, tracking.CHALLENGER, version, tracking_uri=uri)
    current = tracking.get_alias(cfg.registered_model, tracking.CHAMPION, tracking_uri=uri)
    champion = None
    if current is not None and current["version"] != version:
        tags = current["tags"]
        champion = {"score": float(tags["gate_score"]), "tflops": float(tags["tflops_per_sample"])}
    promote, why = promotion_decision(challenger, champion)
    if promote:
        tracking.set_alias(cfg.registered_model, tracking.CHAMPION, version, tracking_uri=uri)
    run = tracking.RunTracker.open(tracking_uri=uri, run_id=ctx.run_id)
    run.log_metrics({"registry/challenger_score": challenger["score"],
                     "registry/challenger_tflops_per_sample": challenger["tflops"],
                     **({"registry/champion_score": champion["score"],
                         "registry/champion_tflops_per_sample": champion["tflops"]} if champion else {})}, step=0)
    run.set_tags({"registry.decision": "promoted" if promote else "kept_champion", "registry.reason": why,
                  "registry.version": version})
    return {"model": cfg.registered_model, "version": version, "promoted": promote, "reason": why,
            "challenger": challenger, "champion": champion}


def build_pipeline(cfg: PipelineConfig, trigger: str = "manual", hooks: RunHooks | None = None,
                   log: Callable[[str], None] | None = None) -> Pipeline:
    """The DAG of `cfg` (see the module docstring)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    corpus = cfg.section("corpus")
    steps: list[Step] = []
    prep_inputs: list[str] = []
    if cfg.corpus.synthetic:
        steps.append(Step(name="synth", fn=lambda ctx: step_synth(cfg, ctx), config=corpus, cpus=1))
        prep_inputs = ["synth"]
    train = cfg.section("train_recipe", "train_overrides")
    steps.append(Step(name="preprocess_pretrain", inputs=prep_inputs, cpus=1, config={**corpus, **train},
                      fn=lambda ctx: step_preprocess(cfg, ctx, "pretrain", "plain", False)))
    data_steps = {}
    if "dpn" in cfg.variants:
        data_steps["dpn"] = "preprocess_instruct_router"
        steps.append(Step(name="preprocess_instruct_router", inputs=prep_inputs, cpus=1, config={**corpus, **train},
                          fn=lambda ctx: step_preprocess(cfg, ctx, "instruct", "vicuna_v1", True)))
    if "dpn" in cfg.variants:
        steps.append(Step(name="preprocess_calibration", inputs=prep_inputs, cpus=1, config={**corpus, **train},
                          fn=lambda ctx: step_preprocess(cfg, ctx, "calibration", "vicuna_v1", True)))
    if any(v != "dpn" for v in cfg.variants):
        steps.append(Step(name="preprocess_instruct", inputs=prep_inputs, cpus=1, config={**corpus, **train},
                          fn=lambda ctx: step_preprocess(cfg, ctx, "instruct", "vicuna_v1", False)))
    stage1_cfg = _stage_config(cfg, 1, [])

    def train_cpus(stage_cfg) -> float:
        # A training stage occupies a core per worker, whatever CPU share Ray reserves for it (the tiny
        # recipe reserves 0.5 so that Ray Data can read beside it): two one-worker stages run side by side.
        sc = stage_cfg.scaling
        return min(cfg.max_cpus, sc.num_workers * max(1.0, sc.cpus_per_worker))

    stage1_inputs = ["preprocess_pretrain"]
    if stage1_cfg.model.vision_path == STAGE0_OUTPUT:
        # Keyed by what stage 0 trains only: other training overrides do not re-train the tower.
        stage0 = {"vision_pretrain": dataclasses.asdict(stage1_cfg.vision_pretrain), "preset": stage1_cfg.model.preset}
        steps.append(Step(name="stage0_vision", config=stage0, cpus=1, fn=lambda ctx: step_stage0(cfg, ctx)))
        stage1_inputs.append("stage0_vision")
    if stage1_cfg.model.llm_path == STAGE0_OUTPUT:
        # Keyed by what it trains and the tokenizer: the synth step's output (an input) or the given one.
        stage0 = {"llm_pretrain": dataclasses.asdict(stage1_cfg.llm_pretrain), "preset": stage1_cfg.model.preset,
                  "tokenizer": None if cfg.corpus.synthetic else cfg.corpus.tokenizer}
        # A few minutes on stage 1's path that can only start after synth: it takes the CPU synth frees
        # before the (seconds-long) preprocessing steps do.
        steps.append(Step(name="stage0_llm", inputs=prep_inputs, config=stage0, cpus=1, priority=1,
                          fn=lambda ctx: step_stage0_llm(cfg, ctx)))
        stage1_inputs.append("stage0_llm")
    steps.append(Step(name="stage1", inputs=stage1_inputs, config=train, cpus=train_cpus(stage1_cfg),
                      fn=lambda ctx: step_stage1(cfg, ctx)))
    stage2_cpus = train_cpus(_stage_config(cfg, 2, []))
    for v in cfg.variants:
        ds = data_steps.get(v, "preprocess_instruct")
        steps.append(Step(name=f"stage2_{v}", inputs=["stage1", ds], config={**train, "variant": v}, cpus=stage2_cpus,
                          fn=lambda ctx, v=v, ds=ds: step_stage2(cfg, ctx, v, ds)))
    eval_inputs = [f"stage2_{v}" for v in cfg.variants] + prep_inputs
    if "dpn" in cfg.variants:
        steps.append(Step(name="route_calibrate", inputs=["stage2_dpn", "preprocess_calibration"], cpus=1,
                          config={**train, "routing": dataclasses.asdict(cfg.routing)},
                          fn=lambda ctx: step_route_calibrate(cfg, ctx)))
        eval_inputs.append("route_calibrate")
    steps.append(Step(name="evaluate", inputs=eval_inputs, cpus=min(cfg.max_cpus, 2.0),
                      config={**cfg.section("benchmarks", "eval_limit", "variants"), **corpus},
                      fn=lambda ctx: step_evaluate(cfg, ctx)))
    steps.append(Step(name="register", inputs=["evaluate"] + [f"stage2_{v}" for v in cfg.variants]
                      + (["route_calibrate"] if "dpn" in cfg.variants else []), cpus=0,
                      config={**cfg.section("registered_model", "gate_metric"), "trigger": trigger},
                      fn=lambda ctx: step_register(cfg, ctx)))
    return Pipeline(steps, Path(cfg.work_dir) / "pipeline", max_cpus=cfg.max_cpus, hooks=hooks, log=log)


def run_pipeline(cfg: PipelineConfig, trigger: str = "manual", log: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Run the pipeline (cached steps skipped) and return the summary printed by `dpn pipeline run`."""
    import ray

    uri = tracking.resolve_tracking_uri(None, cfg.work_dir)
    tracking.check_reachable(uri)  # a down tracking server fails here, before any work
    if not ray.is_initialized():
        # Inside a Ray job RAY_ADDRESS names the cluster; locally this starts a one-machine Ray.
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else int(cfg.max_cpus))
    hooks = MlflowHooks(cfg, trigger, uri)
    pipe = build_pipeline(cfg, trigger, hooks, log)
    status, parent, results = pipe.run()
    by_name = {r.name: r for r in results}
    ev = by_name.get("evaluate")
    chance = None  # the synthetic benchmark's chance level: a uniform guess per question type
    chance_by_category = None
    synth = by_name.get("synth")
    if synth is not None and synth.status in ("ran", "cached"):
        manifest = json.loads((synth.out_dir / synth.outputs["corpus"] / "manifest.json").read_text())
        chance = round(100 * manifest["eval"]["uniform_chance"], 2)
        chance_by_category = {k: round(100 * v["chance"], 2) for k, v in manifest["eval"]["categories"].items()}
    return {
        "status": status,
        "tracking_uri": uri,
        "parent_run_id": parent,
        "steps": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "mlflow_run_id": r.run_id,
                   **({"error": r.error} if r.error else {})} for r in results],
        "results": ev.outputs.get("results", {}) if ev and ev.status in ("ran", "cached") else {},
        # How the registered variant routes: path shares overall and per difficulty (easiest first), mean
        # prefill TFLOPs per difficulty.
        "routing": (ev.outputs.get("results", {}).get(cfg.variants[0], {}).get("routing")
                    if ev and ev.status in ("ran", "cached") else None),
        "registry": by_name["register"].outputs if "register" in by_name else {},
        "eval_summary": str(ev.out_dir / ev.outputs["summary"]) if ev and ev.outputs.get("summary") else None,
        "synthetic_chance_pct": chance,
        "synthetic_chance_by_category_pct": chance_by_category,
    }
