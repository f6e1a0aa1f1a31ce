"""The DPN pipeline as one workflow DAG: its config, its named recipes, which step reads which (what each
step does is in `pipelines.steps`), and running it:

    stage0_vision ─────────────────────────────┐
           ┌─ stage0_llm ──────────────────────┤
    synth ─┼─ preprocess_pretrain ─────────── stage1 ──┬─ stage2_dpn ──── route_calibrate ─┐
           ├─ preprocess_instruct_router ──────────────┤                                    ├─ evaluate ── register
           ├─ preprocess_calibration ──────────────────┼─ stage2_static ───────────────────┤
           └─ preprocess_instruct ─────────────────────┴─ stage2_none ─────────────────────┘

(`synth`, `stage0_vision` and `stage0_llm`, the tiny recipe's pre-training of its vision tower and LLM,
only for the embedded default; real corpora enter the preprocess steps directly, and real recipes start
from CLIP and Vicuna.) Every step is cached by fingerprint (`pipelines.dag`), tracked as a child MLflow run
of one parent run per pipeline execution (`pipelines.tracking`), and resumable after a crash.

Two commands run it: `dpn pipeline run` (the whole DAG, `run_pipeline`) and `dpn train` (the steps up to
stage 1 or stage 2 of one training recipe, `training_pipeline` + `run_training`): one orchestrator, one
cache, whichever command ran a step first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, with_config

from dpn.compressors import COMPRESSORS
from dpn.eval.benchmarks import BENCHMARKS
from pipelines import steps, tracking
from pipelines.dag import Pipeline, RunHooks, Step, StepResult, select
from pipelines.data.sources import CorpusConfig
from pipelines.recipes import (
    RECIPES,
    STAGE0_OUTPUT,
    STAGE1_OUTPUT,
    TrainConfig,
    check_names,
    get_recipe,
    reads_stage1,
)
from pipelines.training.route_calibration import CalibrationSpec
from pipelines.validation import (
    STRICT,
    ConfigError,
    NonEmpty,
    PathComponent,
    build,
    check_fields,
    problems_of,
)

TRAIN_RECIPES = tuple(RECIPES)

TRIGGERS = ("manual", "scheduled")
UNTIL = ("stage1", "stage2", "register")
TRAIN_STAGES = ("1", "2", "all")


@with_config(STRICT)
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
            (`pipelines.training.route_calibration.CalibrationSpec`).
        until: how far to run: "stage1" (stage 0, its data and stage 1), "stage2" (also stage 2 of every
            variant) or "register" (the whole DAG); a step runs only when one of these needs it.

    Validated when built (`pipelines.validation`): every problem of every section -- `corpus`, `routing`,
    `train_overrides` (as the stage configs they make) -- is reported at once, one line each
    (`ConfigError`). Whether the inputs exist is the preflight's business (`preflight`).
    """

    name: PathComponent
    work_dir: NonEmpty = ".dpn_work"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train_recipe: Literal[TRAIN_RECIPES] = "tiny"
    train_overrides: dict[str, Any] = field(default_factory=dict)
    variants: list[str] = field(default_factory=lambda: ["dpn", "static", "none"])
    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    eval_limit: Annotated[int, Field(ge=1)] | None = None
    registered_model: NonEmpty = "dpn"
    gate_metric: NonEmpty = "synthetic/accuracy"
    max_cpus: Annotated[float, Field(gt=0.0)] = 2.0
    experiment: NonEmpty = "dpn"
    routing: CalibrationSpec = field(default_factory=CalibrationSpec)
    until: Literal[UNTIL] = "register"

    def __post_init__(self) -> None:
        problems: list[str] = []
        # Sections given as mappings (a config built in Python from a file's values) are validated whole.
        for name, cls in (("corpus", CorpusConfig), ("routing", CalibrationSpec)):
            if isinstance(getattr(self, name), Mapping):
                try:
                    setattr(self, name, build(cls, getattr(self, name), prefix=f"{name}."))
                except ConfigError as e:
                    problems += e.problems
        try:
            check_fields(self)
        except ConfigError as e:
            problems += e.problems
        problems += _cross_field_problems(vars(self))
        if problems:
            raise ConfigError(problems)
        # Absolute: Ray workers run in their own working directories.
        self.work_dir = str(Path(self.work_dir).absolute())
        if self.routing.budget is not None and "dpn" in self.variants:
            from dpn.presets import get_preset
            from dpn.routing import flops_floor

            floor = flops_floor(get_preset(self.stage_config(2).model.preset))
            if self.routing.budget < floor:
                raise ConfigError([
                    f"routing.budget: {self.routing.budget:g} is below what any routing path reaches: at least "
                    f"{floor:.3f} of the uncompressed prefill FLOPs on this geometry (route_calibrate reports "
                    "the range measured on the calibration data)"])
        pipeline_steps(self)  # every step's config builds and the corpus holds what the steps read

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PipelineConfig:
        """The config of a mapping of fields (a config file's, over a recipe's defaults); ConfigError listing
        every problem at once, the rules that read several fields included."""
        try:
            return build(cls, data)
        except ConfigError as e:
            # A field error stops pydantic before __post_init__: add what its cross-field rules find.
            raise ConfigError(e.problems + _cross_field_problems(data)) from None

    def section(self, *names: str) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {n: d[n] for n in names}

    def stage_config(self, stage: int, extra: Sequence[str] = ()) -> TrainConfig:
        """The training recipe's config of `stage` with `train_overrides`, the work dir and `extra` applied."""
        overrides = [f"{k}={v}" for k, v in self.train_overrides.items()] + [f"work_dir={self.work_dir}"]
        return get_recipe(self.train_recipe, stage, overrides + list(extra))

    @property
    def tracking_uri(self) -> str:
        """Where every run of this pipeline is logged (`pipelines.tracking.resolve_tracking_uri`)."""
        return tracking.resolve_tracking_uri(None, self.work_dir)


def _cross_field_problems(data: Mapping[str, Any]) -> list[str]:
    """What the rules over several fields find (each checked only where its fields are well typed): the
    variants and benchmarks are known and distinct, and both training stages build from `train_recipe`
    and `train_overrides` (a bad override named `train_overrides.<key>`)."""
    problems: list[str] = []
    for name, valid, what in (("variants", COMPRESSORS, "stage-2 compressor"),
                              ("benchmarks", sorted(BENCHMARKS), "benchmark")):
        values = data.get(name)
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            try:
                check_names(name, values, valid, what)
            except ValueError as e:
                problems += problems_of(e)
    recipe, overrides = data.get("train_recipe", "tiny"), data.get("train_overrides", {})
    if recipe in RECIPES and isinstance(overrides, Mapping) and all(isinstance(k, str) for k in overrides):
        for stage in (1, 2):
            try:
                get_recipe(recipe, stage, [f"{k}={v}" for k, v in overrides.items()])
            except ValueError as e:
                problems += [f"train_overrides.{p}" for p in problems_of(e)]
    return problems


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
    given = overrides.get("train_overrides", {})
    if isinstance(given, Mapping):  # anything else is reported by the validation
        overrides["train_overrides"] = {"scaling.num_workers": 1, **given}
    # setdefault: a config file may rename the pipeline or swap the training recipe.
    overrides.setdefault("name", "tiny")
    overrides.setdefault("train_recipe", "tiny")
    return PipelineConfig.from_mapping(overrides)


def llava_1_5_7b_pipeline(**overrides: Any) -> PipelineConfig:
    """LLaVA-1.5-7B with DPN on the real corpora: give `corpus` paths in a config file."""
    overrides.setdefault("benchmarks", ["vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmbench", "seed"])
    overrides.setdefault("gate_metric", "gqa/accuracy")
    overrides.setdefault("max_cpus", 64.0)
    for key, value in (("name", "llava-1.5-7b"), ("train_recipe", "llava-1.5-7b"), ("registered_model", "dpn-llava-1.5-7b")):
        overrides.setdefault(key, value)
    return PipelineConfig.from_mapping(overrides)


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
    """A named recipe, optionally overridden by a YAML/JSON file (a thin override, per the style guide).

    Raises:
        ConfigError (a ValueError) listing every problem of the file at once: unknown keys (with the valid
        ones), wrong types, NaN / inf, out-of-range values, bad training overrides.
    """
    overrides: dict[str, Any] = {}
    if config_file:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise ConfigError([f"pipeline config file {config_file!r} does not exist"])
        try:
            overrides = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError([f"{config_file}: not valid YAML: {' '.join(str(e).split())}"]) from None
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise ConfigError([f"{config_file}: expected a mapping of PipelineConfig field names to values, got "
                               f"{overrides!r:.200}"])
        recipe = overrides.pop("recipe", recipe)
    recipe = recipe or "tiny"
    if recipe not in PIPELINE_RECIPES:
        raise ConfigError([f"recipe: unknown pipeline recipe {recipe!r}; choose one of {sorted(PIPELINE_RECIPES)}"])
    return PIPELINE_RECIPES[recipe](**overrides)


# The `--set` keys of `dpn train` that name a stage's data source: they become the pipeline's corpus, since
# inside the DAG a stage always reads the shards of its preprocess step.
_DATA_SOURCE_KEYS = ("data.synthetic", "data.synth_records", "data.annotations", "data.image_root", "data.shards",
                     "data.tokenizer")


def training_pipeline(recipe: str, stage: str = "all", overrides: Sequence[str] = ()) -> PipelineConfig:
    """The pipeline `dpn train --recipe RECIPE --stage STAGE --set ...` runs: the DAG of the training recipe,
    up to stage 1 ("1") or stage 2 ("2", "all"; stage 1 runs first when stage 2 starts from it).

    The stages' data source (`data.*`, see `DataSpec`) becomes the corpus: `data.synthetic` the synth step
    (`data.synth_records` records per split, seed `model.seed`), `data.annotations` / `data.image_root`
    the preprocess steps of that file (stage 1's as pretrain, stage 2's as instruct), `data.shards` those
    shards as they are; `model.compressor` becomes the stage-2 variant; every other override applies to
    both stages as `train_overrides`. Bad values fail here, naming the field, before anything runs.
    """
    if stage not in TRAIN_STAGES:
        raise ValueError(f"stage must be one of {TRAIN_STAGES}, got {stage!r}")
    stages = (1, 2) if stage == "all" else (int(stage),)
    cfgs = {s: get_recipe(recipe, s, overrides) for s in stages}
    for cfg in cfgs.values():
        cfg.check_paths()
    if stage == "2" and reads_stage1(cfgs[2]) and not cfgs[2].data.synthetic:
        # Stage 1 would have to run first, on pretrain data this run was not given.
        name = "model.path" if cfgs[2].model.path == STAGE1_OUTPUT else "model.projector_path"
        raise ValueError(f"{name}: {STAGE1_OUTPUT!r} stands for stage 1's output; run both stages (--stage all) "
                         "or set it to a directory")
    first = next(iter(cfgs.values()))
    train_overrides: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() not in (*_DATA_SOURCE_KEYS, "model.compressor", "work_dir"):
            train_overrides[key.strip()] = value
    return PipelineConfig(
        name=f"train-{recipe}", work_dir=first.work_dir, corpus=_training_corpus(cfgs), train_recipe=recipe,
        train_overrides=train_overrides, variants=[cfgs[2].model.compressor if 2 in cfgs else "dpn"],
        experiment=first.tracking.experiment, max_cpus=float(max(2, os.cpu_count() or 2)),
        until="stage1" if stage == "1" else "stage2",
    )


def _training_corpus(cfgs: dict[int, TrainConfig]) -> CorpusConfig:
    kinds = {"synthetic" if c.data.synthetic else "shards" if c.data.shards else "annotations" for c in cfgs.values()}
    if len(kinds) > 1:
        raise ValueError(f"data: the stages read different kinds of source ({sorted(kinds)}); give one per run")
    first = next(iter(cfgs.values()))
    if first.data.synthetic:
        n = first.data.synth_records
        return CorpusConfig(synthetic=True, seed=first.model.seed, n_pretrain=n, n_instruct=n, n_eval=15, n_calibration=0)
    kw: dict[str, Any] = {"synthetic": False, "tokenizer": first.data.tokenizer}
    for s, c in cfgs.items():
        split = "pretrain" if s == 1 else "instruct"
        if c.data.shards:
            kw[f"{split}_shards"] = c.data.shards
        else:
            kw.update({f"{split}_annotations": c.data.annotations, "image_root": c.data.image_root})
    return CorpusConfig(**kw)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----- tracking hooks ----------------------------------------------------------------------------
class MlflowHooks(RunHooks):
    """One parent run per pipeline execution (a child of `parent_run_id` when given), one child run per
    executed step (resumed, never duplicated, after a crash); cache hits are recorded on the parent with
    the run that produced them."""

    def __init__(self, cfg: PipelineConfig, trigger: str, parent_run_id: str | None = None):
        self.cfg, self.trigger, self.uri, self.outer = cfg, trigger, cfg.tracking_uri, parent_run_id
        self.parent: tracking.RunTracker | None = None
        self.steps: dict[str, tracking.RunTracker] = {}

    def start_pipeline(self, pipeline_fp: str, resume_run_id: str | None) -> str | None:
        tags = {"dpn.recipe": self.cfg.name, "dpn.fingerprint": pipeline_fp, "dpn.git_sha": git_sha(),
                "dpn.trigger": self.trigger, "dpn.kind": "pipeline"}
        self.parent = tracking.RunTracker.open(tracking_uri=self.uri, work_dir=self.cfg.work_dir,
                                               experiment=self.cfg.experiment, run_id=resume_run_id,
                                               run_name=f"pipeline-{self.cfg.name}", parent_run_id=self.outer,
                                               tags=tags)
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


# What a step runs, for its cache key (`pipelines.code_keys`): its function in `pipelines.steps` and, for the
# steps that resolve the training recipe (their config names a recipe, not its values), the recipes module.
# The wiring below is no part of any key: what it decides reaches a step as its config or its inputs.
_RECIPES_CODE = "pipelines.recipes"


# ----- the DAG -----------------------------------------------------------------------------------
def _data_step(cfg: PipelineConfig, name: str, split: str, stage: int, router: bool, inputs: list[str]) -> Step:
    """The step that gives `split`'s shards: the given shards as they are, else preprocessing of the corpus."""
    given = getattr(cfg.corpus, f"{split}_shards", None)
    if given:
        from pipelines.data.loader import open_shards

        info = open_shards(given)
        config = {"shards": info.path, "fingerprint": info.manifest["fingerprint"], "tokenizer": cfg.corpus.tokenizer}
        return Step(name=name, cpus=0, config=config, code=(steps.given_shards,),
                    fn=lambda ctx: steps.given_shards(ctx, given, cfg.corpus.tokenizer))
    return Step(name=name, inputs=inputs, cpus=1, config=cfg.section("corpus", "train_recipe", "train_overrides"),
                code=(steps.preprocess, _RECIPES_CODE),
                fn=lambda ctx: steps.preprocess(ctx, cfg.corpus, split, cfg.stage_config(stage), cfg.stage_config(1),
                                                router))


def _stage_steps(cfg: PipelineConfig, inputs: list[str]) -> list[Step]:
    """Stage 0 (where the recipe's stage 1 reads "<stage0>"), the pretrain data and stage 1."""
    stage1_cfg = cfg.stage_config(1)
    out = [_data_step(cfg, "preprocess_pretrain", "pretrain", 1, False, inputs)]
    stage1_inputs = ["preprocess_pretrain"]
    if stage1_cfg.model.vision_path == STAGE0_OUTPUT:
        # Keyed by what stage 0 trains only: other training overrides do not re-train the tower.
        config = {"vision_pretrain": dataclasses.asdict(stage1_cfg.vision_pretrain), "preset": stage1_cfg.model.preset}
        out.append(Step(name="stage0_vision", config=config, cpus=1, code=(steps.stage0, _RECIPES_CODE),
                        fn=lambda ctx: steps.stage0(ctx, "vision", cfg.corpus, stage1_cfg, cfg.tracking_uri)))
        stage1_inputs.append("stage0_vision")
    if stage1_cfg.model.llm_path == STAGE0_OUTPUT:
        # Keyed by what it trains and the tokenizer: the synth step's output (an input) or the given one.
        config = {"llm_pretrain": dataclasses.asdict(stage1_cfg.llm_pretrain), "preset": stage1_cfg.model.preset,
                  "tokenizer": None if cfg.corpus.synthetic else cfg.corpus.tokenizer}
        # A few minutes on stage 1's path that can only start after synth: it takes the CPU synth frees
        # before the (seconds-long) preprocessing steps do.
        out.append(Step(name="stage0_llm", inputs=inputs, config=config, cpus=1, priority=1,
                        code=(steps.stage0, _RECIPES_CODE),
                        fn=lambda ctx: steps.stage0(ctx, "llm", cfg.corpus, stage1_cfg, cfg.tracking_uri)))
        stage1_inputs.append("stage0_llm")
    out.append(Step(name="stage1", inputs=stage1_inputs, config=cfg.section("train_recipe", "train_overrides"),
                    code=(steps.stage1, _RECIPES_CODE),
                    cpus=_train_cpus(cfg, stage1_cfg),
                    fn=lambda ctx: steps.stage1(ctx, lambda extra: cfg.stage_config(1, extra), cfg.tracking_uri)))
    return out


def _train_cpus(cfg: PipelineConfig, stage_cfg: TrainConfig) -> float:
    # A training stage occupies a core per worker, whatever CPU share Ray reserves for it (the tiny recipe
    # reserves 0.5 so that Ray Data can read beside it): two one-worker stages run side by side.
    sc = stage_cfg.scaling
    return min(cfg.max_cpus, sc.num_workers * max(1.0, sc.cpus_per_worker))


def pipeline_steps(cfg: PipelineConfig, trigger: str = "manual") -> list[Step]:
    """The steps `cfg` runs (see the module docstring), up to `cfg.until`. Raises ValueError when a step's
    config does not build or the corpus lacks what a step reads."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    corpus = cfg.section("corpus")
    prep = ["synth"] if cfg.corpus.synthetic else []
    dag = [Step(name="synth", fn=lambda ctx: steps.synth(ctx, cfg.corpus), config=corpus, cpus=1,
                code=(steps.synth,))] if prep else []
    dag += _stage_steps(cfg, prep)
    if cfg.until == "stage1":
        return _selected(cfg, dag, ["stage1"])
    train = cfg.section("train_recipe", "train_overrides")
    data_steps = {v: "preprocess_instruct_router" if v == "dpn" else "preprocess_instruct" for v in cfg.variants}
    for name in dict.fromkeys(data_steps.values()):
        dag.append(_data_step(cfg, name, "instruct", 2, name.endswith("_router"), prep))
    stage2_cfgs = {v: cfg.stage_config(2, [f"model.compressor={v}"]) for v in cfg.variants}
    for v, ds in data_steps.items():
        dag.append(Step(name=f"stage2_{v}", inputs=(["stage1"] if reads_stage1(stage2_cfgs[v]) else []) + [ds],
                        code=(steps.stage2, _RECIPES_CODE),
                        config={**train, "variant": v}, cpus=_train_cpus(cfg, stage2_cfgs[v]),
                        fn=lambda ctx, v=v, ds=ds: steps.stage2(ctx, lambda extra: cfg.stage_config(2, extra), v, ds,
                                                                cfg.tracking_uri)))
    if cfg.until == "stage2":
        return _selected(cfg, dag, [f"stage2_{v}" for v in cfg.variants])
    stage2 = [f"stage2_{v}" for v in cfg.variants]
    calibrated = []
    if "dpn" in cfg.variants:
        dag.append(_data_step(cfg, "preprocess_calibration", "calibration", 2, True, prep))
        dag.append(Step(name="route_calibrate", inputs=["stage2_dpn", "preprocess_calibration"], cpus=1,
                        code=(steps.route_calibrate, _RECIPES_CODE),
                        config={**train, "routing": dataclasses.asdict(cfg.routing)},
                        fn=lambda ctx: steps.route_calibrate(ctx, cfg.routing, stage2_cfgs["dpn"].scaling.use_gpu,
                                                             cfg.tracking_uri)))
        calibrated = ["route_calibrate"]
    dag.append(Step(name="evaluate", inputs=stage2 + prep + calibrated, cpus=min(cfg.max_cpus, 2.0),
                    code=(steps.evaluate,),
                    config={**cfg.section("benchmarks", "eval_limit", "variants"), **corpus},
                    fn=lambda ctx: steps.evaluate(ctx, cfg.corpus, cfg.variants, cfg.benchmarks, cfg.eval_limit,
                                                  cfg.work_dir, cfg.experiment)))
    dag.append(Step(name="register", inputs=["evaluate", *stage2, *calibrated], cpus=0, code=(steps.register,),
                    config={**cfg.section("registered_model", "gate_metric"), "trigger": trigger},
                    fn=lambda ctx: steps.register(ctx, cfg.variants[0], cfg.registered_model, cfg.gate_metric,
                                                  cfg.tracking_uri)))
    return _selected(cfg, dag, ["register"])


# What a step reads from the corpus (`CorpusConfig.require`): checked for the steps that run only.
_READS = {"preprocess_pretrain": "pretrain", "preprocess_instruct": "instruct", "preprocess_instruct_router": "instruct",
          "preprocess_calibration": "calibration", "stage0_llm": "tokenizer", "evaluate": "eval"}


def _selected(cfg: PipelineConfig, dag: list[Step], targets: list[str]) -> list[Step]:
    """The steps `targets` need, the corpus checked to hold what they read."""
    chosen = select(dag, targets)
    for step in chosen:
        if step.name in _READS:
            cfg.corpus.require(_READS[step.name])
    return chosen


def build_pipeline(cfg: PipelineConfig, trigger: str = "manual", hooks: RunHooks | None = None,
                   log: Callable[[str], None] | None = None) -> Pipeline:
    """The DAG of `cfg` (see the module docstring)."""
    return Pipeline(pipeline_steps(cfg, trigger), Path(cfg.work_dir) / "pipeline", max_cpus=cfg.max_cpus,
                    hooks=hooks, log=log)


def execute(cfg: PipelineConfig, trigger: str = "manual", log: Callable[[str], None] | None = None,
            parent_run_id: str | None = None) -> tuple[str, str | None, dict[str, StepResult]]:
    """Run the steps of `cfg` that are not cached, tracked in MLflow under one parent run (itself a child
    of `parent_run_id`, default $DPN_PARENT_RUN_ID). Returns (status, parent run id, results by step)."""
    import ray

    from pipelines.preflight import preflight

    pipe = build_pipeline(cfg, trigger, MlflowHooks(cfg, trigger, tracking.resolve_parent_run_id(parent_run_id)), log)
    # First, before Ray or the tracking server: a second run on this work dir stops here at once
    # (WorkDirBusy), and the lock is held until the last step is published.
    lock = pipe.lock(f"pipeline {cfg.name}")
    try:
        problems = preflight(cfg, pipe.steps)  # a missing input fails in seconds, not after hours of training
        if problems:
            raise ConfigError(problems)
        tracking.check_reachable(cfg.tracking_uri)  # a down tracking server fails here, before any work
        if not ray.is_initialized():
            # Inside a Ray job RAY_ADDRESS names the cluster; locally this starts a one-machine Ray.
            ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else int(cfg.max_cpus))
        status, parent, results = pipe.run()
    finally:
        lock.release()
    return status, parent, {r.name: r for r in results}


def _step_rows(results: dict[str, StepResult]) -> list[dict[str, Any]]:
    return [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "mlflow_run_id": r.run_id,
             **({"error": r.error} if r.error else {})} for r in results.values()]


def run_pipeline(cfg: PipelineConfig, trigger: str = "manual", log: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Run the pipeline (cached steps skipped) and return the summary printed by `dpn pipeline run`."""
    status, parent, by_name = execute(cfg, trigger, log)
    ev = by_name.get("evaluate")
    ev_done = ev is not None and ev.status in ("ran", "cached")
    chance = None  # the synthetic benchmark's chance level: a uniform guess per question type
    chance_by_category = None
    synth = by_name.get("synth")
    if synth is not None and synth.status in ("ran", "cached"):
        manifest = json.loads((synth.out_dir / synth.outputs["corpus"] / "manifest.json").read_text())
        chance = round(100 * manifest["eval"]["uniform_chance"], 2)
        chance_by_category = {k: round(100 * v["chance"], 2) for k, v in manifest["eval"]["categories"].items()}
    return {
        "status": status,
        "tracking_uri": cfg.tracking_uri,
        "parent_run_id": parent,
        "steps": _step_rows(by_name),
        "results": ev.outputs.get("results", {}) if ev_done else {},
        # How the registered variant routes: path shares overall and per difficulty (easiest first), mean
        # prefill TFLOPs per difficulty.
        "routing": ev.outputs.get("results", {}).get(cfg.variants[0], {}).get("routing") if ev_done else None,
        "registry": by_name["register"].outputs if "register" in by_name else {},
        "eval_summary": str(ev.out_dir / ev.outputs["summary"]) if ev and ev.outputs.get("summary") else None,
        "synthetic_chance_pct": chance,
        "synthetic_chance_by_category_pct": chance_by_category,
    }


def run_training(cfg: PipelineConfig, log: Callable[[str], None] | None = None, parent_run_id: str | None = None
                 ) -> dict[str, Any]:
    """Run a `training_pipeline` and return the summary printed by `dpn train`: the steps, and per stage
    step its outputs with absolute paths (model_dir, projector_dir, steps, last metrics, MLflow run)."""
    status, parent, by_name = execute(cfg, log=log, parent_run_id=parent_run_id)
    stages = []
    for name, r in by_name.items():
        if name.startswith(("stage1", "stage2_")) and r.status in ("ran", "cached"):
            out = {k: v for k, v in r.outputs.items() if k != "config"}
            for key in ("model_dir", "projector_dir"):
                if out.get(key):
                    out[key] = str(r.out_dir / out[key])
            stages.append({"name": name, "status": r.status, **out})
    return {"status": status, "tracking_uri": cfg.tracking_uri, "parent_run_id": parent,
            "steps": _step_rows(by_name), "stages": stages}
