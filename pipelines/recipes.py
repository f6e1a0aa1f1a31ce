"""Training configs and named recipes.

A recipe is a Python function `recipe(stage) -> TrainConfig`; `get_recipe(name, stage, overrides)` looks
it up and applies `key.path=value` overrides with type checking. Every config is a typed
`@dataclass(kw_only=True)` validated in `__post_init__`, so a bad value fails when the config is built,
naming the field, before Ray or any worker starts. Paths that must exist are checked separately by
`TrainConfig.check_paths()` (a stage-2 recipe may name the output of a stage 1 that has not run yet).

Recipes:
    tiny            the embedded default: the `tiny` geometry from random weights on the synthetic corpus
                    (its tower and LLM pre-trained by stage 0), Ray CPU workers, fp32; ~12 min on 2 cores.
    llava-1.5-7b    the paper's setup: CLIP ViT-L/336 + Vicuna-7B v1.5, 8 GPUs, bf16. Stage 1: lr 1e-3,
                    global batch 256, ZeRO-2; stage 2: lr 2e-5, global batch 128, cosine, warmup 0.03,
                    gradient checkpointing, max length 2048, ZeRO-2.
    llava-1.5-13b   the same with Vicuna-13B v1.5, stage 2 with ZeRO-3.
    llava-hr-tiny   LLaVA-HR's dual-resolution tower in miniature (`llava-hr-tiny` geometry, random weights,
                    no stage 0) on the synthetic corpus: the HR path end to end on CPU.
    llava-hr-7b     LLaVA-HR-7B + DPN as the reference trains it (aihao2000/DPN-LLaVA
    llava-hr-x-13b  scripts/v1_5/train_dpn_llava_hr{,_x}.sh): 1024-px images, stage 2 lr 2e-5, global batch
                    128, max length 2496, ZeRO-3, the vision tower (both branches, MR-adapters) trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, with_config

from dpn.compressors import COMPRESSORS, ROUTER_OBJECTIVES
from dpn.conversation import TEMPLATES
from pipelines.validation import STRICT, ConfigError, NonEmpty, PathComponent, build, check_fields

TEMPLATE_NAMES = tuple(TEMPLATES)
STAGES = (1, 2)
INITS = ("random", "pretrained", "llava_hf", "components")
PRECISIONS = ("fp32", "bf16")  # fp16 is not offered: DeepSpeed on CPU lacks it and bf16 needs no loss scaling
SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = (0, 1, 2, 3)
MODEL_PRESETS = ("tiny", "test-tiny", "llava-1.5-7b", "llava-1.5-13b", "llava-hr-7b", "llava-hr-x-13b",
                 "llava-hr-tiny")  # as `dpn.presets.PRESETS`
# Placeholder (model.path / model.projector_path of stage 2) for the outputs of the recipe's stage 1: the
# pipeline's stage-2 steps read the stage1 step and fill it in (`chain_stage2`).
STAGE1_OUTPUT = "<stage1>"
# Placeholder (model.vision_path / model.llm_path of stage 1) for the vision tower / LLM that stage 0 trains
# (`pipelines.training.stage0`): the pipeline's stage0_vision / stage0_llm steps.
STAGE0_OUTPUT = "<stage0>"


# Field types with their ranges, checked by pydantic (`pipelines.validation`): NaN and infinity never pass.
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


def _fail(field_name: str, value: Any, valid: str) -> None:
    raise ValueError(f"{field_name}: {valid}, got {value!r}")


def check_names(field_name: str, values: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    """`values` as a list, checked to be non-empty, known (in `valid`) and distinct; ValueError naming the
    field and the bad names otherwise. Shared by every config that lists compressors or benchmarks."""
    values = list(values)
    if not values:
        raise ValueError(f"{field_name} must name at least one {what}")
    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(f"{field_name}: unknown {what}(s) {bad}; valid: {list(valid)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field_name} must be distinct, got {values}")
    return values


@with_config(STRICT)
@dataclass(kw_only=True)
class ModelSpec:
    """Where the model's weights come from and which parts train."""

    preset: Literal[MODEL_PRESETS] = "tiny"
    """Geometry (`dpn.presets`) of a model built from random weights (init="random")."""
    init: Literal[INITS] = "random"
    """"random" (preset, seeded), "pretrained" (our `save_pretrained` dir, e.g. stage 1's model),
    "llava_hf" (a llava-hf checkpoint dir), "components" (LLM dir + CLIP dir [+ projector])."""
    path: str | None = None
    """The checkpoint directory for init="pretrained" / "llava_hf"."""
    llm_path: str | None = None
    """LLaMA-family LLM directory: the LLM of init="components"; with init="random", loaded over the
    random LLM (same geometry as the preset, the tokenizer's vocabulary). "<stage0>": the LLM stage 0
    trains (tiny recipe)."""
    vision_path: str | None = None
    """CLIP vision model directory: the vision tower of init="components"; with init="random", loaded over
    the random tower (same geometry as the preset). "<stage0>": the tower stage 0 trains (tiny recipe)."""
    projector_path: str | None = None
    """A stage-1 projector (directory or file: `multi_modal_projector.safetensors` or LLaVA's
    `mm_projector.bin`) loaded over the initial weights. Stage 1 is skipped when it exists."""
    compressor: Literal[COMPRESSORS] = "dpn"
    """Compressor of the trained model: stage 1 trains plain LLaVA ("none"); stage 2 "dpn" (or the
    "static" / "none" ablations)."""
    route_loss_coef: NonNegative | None = None
    """Weight of the routing loss; None keeps the model config's (0.001, the paper's)."""
    router_objective: Literal[ROUTER_OBJECTIVES] = "reference"
    """How the routers learn (`dpn.compressors.ROUTER_OBJECTIVES`): "reference" (the paper's), or
    "counterfactual" (stage 2 trains the LLM on uniformly sampled paths; the pipeline's `route_calibrate`
    step then fits the routers to held-out per-path losses, `dpn.routing`)."""
    train_vision_tower: bool = False
    """Stage 2 only: also train the vision tower (the reference does; the paper's 7B recipe does not)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (memory for compute)."""
    seed: Seed = 0
    """Seed of random initialisation, router sampling and data order."""

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.init in ("pretrained", "llava_hf") and not self.path:
            _fail("model.path", self.path, f"is required with model.init={self.init!r} (a checkpoint directory)")
        if self.init == "components" and not (self.llm_path and self.vision_path):
            _fail("model.llm_path/model.vision_path", (self.llm_path, self.vision_path),
                  "are both required with model.init='components'")
        if self.vision_path and self.init not in ("random", "components"):
            _fail("model.vision_path", self.vision_path,
                  f"is only read with model.init='random' or 'components', not {self.init!r} (its checkpoint "
                  "holds the vision tower); unset it")
        if self.llm_path and self.init not in ("random", "components"):
            _fail("model.llm_path", self.llm_path,
                  f"is only read with model.init='random' or 'components', not {self.init!r} (its checkpoint "
                  "holds the LLM); unset it")
        for name in ("vision_path", "llm_path"):
            if getattr(self, name) == STAGE0_OUTPUT and self.init != "random":
                _fail(f"model.{name}", STAGE0_OUTPUT, "(stage 0's output) needs model.init='random'")


@with_config(STRICT)
@dataclass(kw_only=True)
class DataSpec:
    """Training data. Exactly one source: preprocessed Parquet shards, a LLaVA JSON, or the synthetic
    corpus. `dpn train` maps the source onto the pipeline's inputs (`pipelines.workflow.training_pipeline`:
    the synth and preprocess steps, cached like every step); the stage itself (`run_stage`) always reads
    shards, which the pipeline fills in."""

    shards: str | None = None
    """Directory of Parquet shards written by `dpn preprocess`; used as they are."""
    annotations: str | None = None
    """LLaVA-format JSON (LCS-558K / mix665K schema), preprocessed by the pipeline first."""
    image_root: str | None = None
    """Root the records' `image` paths are relative to (with `annotations`)."""
    tokenizer: str | None = None
    """Tokenizer directory (`save_pretrained`); copied next to the trained model."""
    synthetic: bool = False
    """Train on the synthetic corpus (`dpn synth`, the pipeline's synth step): its pretrain.json for stage
    1, its instruct.json for stage 2, its tokenizer."""
    synth_records: Annotated[int, Field(ge=15)] = 256
    """Records per split of the synthetic corpus `dpn train` generates (with `synthetic`)."""
    template: Literal[TEMPLATE_NAMES] = "plain"
    """Conversation template: "plain" (stage 1) or "vicuna_v1" (stage 2)."""
    add_router_token: bool = False
    """Append `<ROUTER>` to every human turn of image samples (DPN stage 2)."""
    max_length: Annotated[int, Field(ge=8)] = 2048
    """Records longer than this many tokens (image tokens included) are quarantined by preprocessing."""
    micro_batch_size: Count = 4
    """Samples per micro-batch per worker."""
    group_by_length: bool = True
    """Micro-batches hold samples of similar length (less padding). They are always single-modality
    (image-only or text-only), as in the reference: `pipelines.data.loader`."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        sources = [name for name in ("shards", "annotations") if getattr(self, name)] + (
            ["synthetic"] if self.synthetic else [])
        if len(sources) != 1:
            _fail("data.shards/data.annotations/data.synthetic", sources,
                  "exactly one data source must be set (Parquet shards, a LLaVA JSON, or synthetic=true)")
        if self.annotations and not self.image_root:
            _fail("data.image_root", self.image_root, "is required with data.annotations")
        if (self.shards or self.annotations) and not self.tokenizer:
            _fail("data.tokenizer", self.tokenizer, "is required with data.shards / data.annotations")


@with_config(STRICT)
@dataclass(kw_only=True)
class OptimSpec:
    """AdamW with warmup and a decay schedule; the global batch is fixed, whatever the worker count."""

    lr: LearningRate
    """Peak learning rate (stage 1: 1e-3, stage 2: 2e-5 in the paper)."""
    global_batch_size: Count
    """Samples per optimizer step over all workers = micro_batch_size * num_workers * accumulation."""
    weight_decay: NonNegative = 0.0
    warmup_ratio: Fraction = 0.03
    """Share of the steps with linear warmup from 0."""
    schedule: Literal[SCHEDULES] = "cosine"
    """Decay after warmup: "cosine" (to 0), "linear" (to 0) or "constant"."""
    num_epochs: Annotated[float, Field(gt=0.0)] = 1.0
    """Passes over the data; the step count is ceil(num_epochs * rows / global_batch_size)."""
    max_steps: Count | None = None
    """Fixed number of optimizer steps (overrides num_epochs)."""
    grad_clip: NonNegative = 1.0
    """Max global grad norm; 0 disables clipping."""
    beta1: Fraction = 0.9
    beta2: Fraction = 0.999
    eps: Annotated[float, Field(gt=0.0)] = 1e-8

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@with_config(STRICT)
@dataclass(kw_only=True)
class VisionPretrainSpec:
    """Stage 0 (embedded default only): pre-train the random vision tower to name the colour and shape of
    the object under every patch of synthetic scenes (`pipelines.training.stage0.vision`). The real recipes start
    from CLIP; a random tiny tower gives the LLM nothing readable for hundreds of steps
    (bench/RESULTS_learnability.md). Runs when stage 1's `model.vision_path` is "<stage0>"."""

    steps: Count = 3000
    """Optimizer steps (fresh scenes every step; ~0.08 s each for the tiny tower on one core, ~4 min, beside
    the LLM's stage 0; 3,000 rather than round 8's 4,000 keeps `make demo` within 10 minutes). Object-patch shape accuracy: ~60% after 250 steps, 80-90% after 1,000, 97-99% after
    2,000-4,000. With a question-trained LLM the 4,000-step tower gives the stage-2 model ~5 points more
    than a 2,000-step one after 600 steps (the recipe's LLM: 63.3 against 57.0%; round 7's: 67.7 against
    62.3%; bench/RESULTS_learnability.md, round 8)."""
    batch_size: Count = 32
    lr: LearningRate = 1e-3
    warmup_ratio: Fraction = 0.03
    schedule: Literal[SCHEDULES] = "cosine"
    grad_clip: NonNegative = 1.0
    seed: Seed = 0
    """Seed of the tower's initialisation and of the scenes drawn."""
    eval_images: Count = 96
    """Held-out scenes scored (object-patch colour / shape accuracy) every `eval_every` steps."""
    eval_every: Count = 250

    def __post_init__(self) -> None:
        check_fields(self, "vision_pretrain")


@with_config(STRICT)
@dataclass(kw_only=True)
class LLMPretrainSpec:
    """Stage 0 (embedded default only), language side: train the random LLM on the corpus' questions with
    each scene given as object tokens, bare form first, then LLaVA's template (`pipelines.training.stage0.llm`).
    The real recipes start from Vicuna; a random tiny LLM learning the questions and the images at once
    stays near chance in the demo's budget (bench/RESULTS_learnability.md, round 7). Runs when stage 1's
    `model.llm_path` is "<stage0>"."""

    steps: Count = 6000
    """Most optimizer steps (fresh records every step, ~0.1 s each on one core); the stage stops earlier
    once the held-out accuracy in the template reaches `target_accuracy_pct`."""
    bare_steps: Annotated[int, Field(ge=0)] = 1500
    """The first steps train the bare questions only (no system prompt, no short-answer instruction)."""
    bare_mix: Fraction = 0.3
    """Share of bare samples after `bare_steps` (the rest: whole records in vicuna_v1)."""
    target_accuracy_pct: Annotated[float, Field(ge=0.0, le=100.0)] = 75.0
    """Stop at the first evaluation after `bare_steps` with this held-out accuracy in the template (the
    LLM binds an object to its question at a step that varies by seed; 100 never stops early)."""
    batch_size: Count = 16
    lr: LearningRate = 5e-4
    warmup_ratio: Fraction = 0.03
    schedule: Literal[SCHEDULES] = "constant"
    grad_clip: NonNegative = 1.0
    init_std: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Std of the random LLM's initial weights. 0.1, not the preset's 0.02: with 0.02 the demo corpus' seed 0
    was at 67% after 6,000 steps (60.7% after 3,000 in a second run) and other runs needed 2,500-4,250
    steps; with 0.1 seeds 0 / 1 / 2 reached 75% after 2,250 / 2,000 / 2,500 (bench/RESULTS_learnability.md,
    round 8)."""
    seed: Seed = 0
    """Seed of the LLM's initialisation and of the records drawn."""
    eval_questions: Count = 300
    """Held-out questions (drawn as the eval split's, from another seed stream) scored every `eval_every`."""
    eval_every: Count = 250

    def __post_init__(self) -> None:
        check_fields(self, "llm_pretrain")
        if self.bare_steps > self.steps:
            _fail("llm_pretrain.bare_steps", self.bare_steps, f"must be <= llm_pretrain.steps ({self.steps})")


@with_config(STRICT)
@dataclass(kw_only=True)
class ScalingSpec:
    """Ray workers and the DeepSpeed engine each runs."""

    num_workers: Count = 2
    """Ray Train workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo (DS_ACCELERATOR=cpu)."""
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    """CPUs Ray reserves per worker. Ray Data reads the shards with what the workers leave free, so the
    workers must not take every CPU of the cluster (the tiny recipe uses 0.5 of 2 cores)."""
    precision: Literal[PRECISIONS] = "fp32"
    """"fp32" or "bf16" (weights and activations; DeepSpeed keeps fp32 master weights)."""
    zero_stage: Literal[ZERO_STAGES] = 2
    """DeepSpeed ZeRO stage: 2 for stage 1 and LLaVA-1.5-7B stage 2, 3 for the 13B model."""
    offload_optimizer: bool = False
    """ZeRO-Offload of the optimizer state to CPU memory (stage >= 1)."""

    def __post_init__(self) -> None:
        check_fields(self, "scaling")
        if self.offload_optimizer and self.zero_stage == 0:
            _fail("scaling.offload_optimizer", self.offload_optimizer, "needs scaling.zero_stage >= 1")


@with_config(STRICT)
@dataclass(kw_only=True)
class CheckpointSpec:
    """Fault tolerance: DeepSpeed state of every worker reported to Ray Train every N steps."""

    every_n_steps: Count = 50
    """Checkpoint interval in optimizer steps (the last step is always checkpointed)."""
    num_to_keep: Count = 2
    """Checkpoints kept in storage (older ones are deleted)."""
    max_failures: Annotated[int, Field(ge=0)] = 3
    """Worker-group restarts (from the last checkpoint) before the stage fails."""

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")


@with_config(STRICT)
@dataclass(kw_only=True)
class TrackingSpec:
    """MLflow logging of a stage (through `pipelines.tracking`, from the rank-0 worker). Which tracking
    server is not a training setting: `pipelines.tracking.resolve_tracking_uri` decides it for every run
    ($MLFLOW_TRACKING_URI, else the SQLite store under the work dir)."""

    experiment: NonEmpty = "dpn"
    """Experiment of a run `run_stage` creates itself (a pipeline step's run is in the pipeline's)."""
    log_every_n_steps: Count = 1
    system_metrics: bool = True
    """Sample CPU/memory/GPU into `system/*` metrics while the stage runs."""
    system_metrics_interval_s: Annotated[float, Field(ge=0.1)] = 10.0

    def __post_init__(self) -> None:
        check_fields(self, "tracking")


# Fields that do not change what is trained: left out of the run fingerprint, so that e.g. a different
# tracking server or retry budget still resumes the same run.
_NOT_FINGERPRINTED = ("run_name", "tracking", "checkpoint.max_failures")


@with_config(STRICT)
@dataclass(kw_only=True)
class TrainConfig:
    """One training stage."""

    recipe: NonEmpty
    """Name of the recipe this config came from."""
    stage: Literal[STAGES]
    """1: projector pre-training (vision tower and LLM frozen); 2: DPN instruction tuning."""
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    vision_pretrain: VisionPretrainSpec = field(default_factory=VisionPretrainSpec)
    """Stage 0 (vision tower), used only when `model.vision_path` is "<stage0>"."""
    llm_pretrain: LLMPretrainSpec = field(default_factory=LLMPretrainSpec)
    """Stage 0 (LLM), used only when `model.llm_path` is "<stage0>"."""
    work_dir: str = ".dpn_work"
    """Root of outputs, Ray storage and the default MLflow store."""
    run_name: PathComponent | None = None
    """Run name (Ray storage folder, MLflow run; letters, digits, '.', '_', '-'); None =
    "<recipe>-stage<N>-<config fingerprint>", so re-running the same command resumes the same run."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stage == 1:
            if self.model.compressor != "none":
                _fail("model.compressor", self.model.compressor,
                      "must be 'none' in stage 1 (projector pre-training trains plain LLaVA-1.5)")
            if self.model.train_vision_tower:
                _fail("model.train_vision_tower", True, "must be false in stage 1 (only the projector trains)")
        else:
            for name in ("vision_path", "llm_path"):
                if getattr(self.model, name) == STAGE0_OUTPUT:
                    _fail(f"model.{name}", STAGE0_OUTPUT, "is stage 1's input; stage 2 starts from stage 1's model")
        per_step = self.data.micro_batch_size * self.scaling.num_workers
        if self.optim.global_batch_size % per_step:
            valid = [per_step * k for k in range(1, 5)]
            _fail("optim.global_batch_size", self.optim.global_batch_size,
                  f"must be a multiple of data.micro_batch_size * scaling.num_workers = "
                  f"{self.data.micro_batch_size} * {self.scaling.num_workers} (e.g. {valid})")

    # ----- derived --------------------------------------------------------------------------------
    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per optimizer step: the global batch is kept for any worker count."""
        return self.optim.global_batch_size // (self.data.micro_batch_size * self.scaling.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 (first 10 hex) of everything that changes what is trained."""
        d = self.to_dict()
        for key in _NOT_FINGERPRINTED:
            parent, _, leaf = key.rpartition(".")
            (d[parent] if parent else d).pop(leaf, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.recipe}-stage{self.stage}-{self.fingerprint()}"

    def check_paths(self) -> None:
        """Raise FileNotFoundError naming the field of a path that does not exist (called by the driver
        before any worker starts)."""
        checks = [
            ("model.path", self.model.path, True),
            ("model.llm_path", self.model.llm_path, True),
            ("model.vision_path", self.model.vision_path, True),
            ("data.shards", self.data.shards, True),
            ("data.annotations", self.data.annotations, False),
            ("data.image_root", self.data.image_root, True),
            ("data.tokenizer", self.data.tokenizer, True),
        ]
        if self.stage == 2:
            checks.append(("model.projector_path", self.model.projector_path, None))
        for name, value, is_dir in checks:
            if not value or value in (STAGE1_OUTPUT, STAGE0_OUTPUT):  # checked once that stage has run
                continue
            if value.startswith("<") and value.endswith(">"):
                raise FileNotFoundError(f"{name} is not set (the recipe's placeholder {value!r}): give a local path "
                                        f"with --set {name}=PATH")
            p = Path(value)
            ok = p.is_dir() if is_dir else p.is_file() if is_dir is False else p.exists()
            if not ok:
                kind = "directory" if is_dir else "file" if is_dir is False else "file or directory"
                raise FileNotFoundError(f"{name}: {kind} {value!r} does not exist")


# ----- overrides ------------------------------------------------------------------------------------
def _parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse `text` as the annotated type `hint` (int, float, bool, str, a Literal of them, X | None); the
    field's own range is checked when the config is built."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        values = typing.get_args(hint)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{key}: expected one of {list(values)}, got {text!r}") from None
        return text
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if hint is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a bool (true/false), got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}: expected an int, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {text!r}") from None
    if hint is str:
        return text
    raise ValueError(f"{key}: fields of type {hint} cannot be set from the command line")


def _set_override(data: dict[str, Any], item: str) -> None:
    """Apply one `key.path=value` override to `data` (a `to_dict()`), the value parsed as the field's type."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    cls: Any = TrainConfig
    node = data
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            raise ValueError(f"{key}: unknown field; {where} has fields {sorted(hints)}")
        hint = hints[part]
        if i < len(parts) - 1:
            if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
                raise ValueError(f"{key}: unknown field; {'.'.join(parts[: i + 1])} is not a section")
            cls, node = hint, node[part]
        else:
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                raise ValueError(f"{key}: is a section; set one of its fields, e.g. "
                                 f"{key}.{sorted(typing.get_type_hints(hint))[0]}")
            node[part] = _parse_value(text, hint, key)


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Return a new config with `key.path=value` overrides applied (e.g. "optim.lr=1e-4",
    "scaling.num_workers=4", "model.projector_path=none"), each value parsed as the field's type, and the
    whole config validated again.

    Raises:
        ConfigError (a ValueError) listing every problem at once, each naming its key: an unknown field, a
        malformed override, a value of the wrong type, out of range, NaN or infinite.
    """
    data = cfg.to_dict()
    problems = []
    for item in overrides:
        try:
            _set_override(data, item)
        except ValueError as e:
            problems.append(str(e))
    try:
        built = config_from_dict(data)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return built


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild (and validate) a `TrainConfig` from `to_dict()` output, e.g. on a Ray worker. Raises
    ConfigError listing every problem."""
    return build(TrainConfig, data)


def chain_stage2(stage2: TrainConfig, model_dir: str | None, projector_dir: str | None) -> TrainConfig:
    """Point a stage-2 config's "<stage1>" placeholders at stage 1's outputs (its model directory and
    projector directory; model_dir is None when stage 1 was skipped for a given projector)."""
    model = stage2.model
    if model.path == STAGE1_OUTPUT:
        if not model_dir:
            raise ValueError("model.path: stage 1 was skipped (a projector was given), so it has no full model to "
                             "start stage 2 from; set model.path or model.init")
        model = dataclasses.replace(model, path=model_dir)
    if model.projector_path == STAGE1_OUTPUT:
        model = dataclasses.replace(model, projector_path=projector_dir)
    return dataclasses.replace(stage2, model=model)


def reads_stage1(stage2: TrainConfig) -> bool:
    """Whether a stage-2 config starts from stage 1's outputs (a "<stage1>" placeholder)."""
    return STAGE1_OUTPUT in (stage2.model.path, stage2.model.projector_path)


# ----- recipes --------------------------------------------------------------------------------------
def tiny(stage: int) -> TrainConfig:
    """The embedded default: `tiny` geometry from random weights, synthetic corpus, 2 CPU workers, fp32.

    There are no pretrained weights offline: stage 0 first trains the random vision tower on the synthetic
    scenes (`vision_pretrain`, standing in for CLIP) and, beside it, the random LLM on the corpus'
    questions with scenes as text (`llm_pretrain`, standing in for Vicuna); stage 1 trains the projector
    of a LLaVA built from the two and saves the whole model; stage 2 starts from it with fresh routers.
    """
    if stage == 1:
        return TrainConfig(
            recipe="tiny", stage=1,
            model=ModelSpec(preset="tiny", init="random", vision_path=STAGE0_OUTPUT, llm_path=STAGE0_OUTPUT,
                            compressor="none"),
            data=DataSpec(synthetic=True, template="plain", max_length=512, micro_batch_size=8),
            optim=OptimSpec(lr=1e-3, global_batch_size=32, warmup_ratio=0.03, schedule="cosine"),
            scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5, precision="fp32", zero_stage=2),
            checkpoint=CheckpointSpec(every_n_steps=16),
        )
    return TrainConfig(
        recipe="tiny", stage=2,
        # model.path is filled in with stage 1's output by the pipeline (`chain_stage2`).
        model=ModelSpec(preset="tiny", init="pretrained", path=STAGE1_OUTPUT, compressor="dpn"),
        data=DataSpec(synthetic=True, template="vicuna_v1", add_router_token=True, max_length=512, micro_batch_size=8),
        # 5e-4 for the 4-layer tiny LLM (38 / 47 / 49% after 200 / 400 / 600 steps, against 24 / 44 / 50% at
        # 3e-4 and 36 / 43% at 8e-4; the 8-layer LLM it replaced never left the answer priors at 6e-4). Batch
        # 16: per sample seen, batch 32 learns far slower (22% vs 46% after 6,400 samples) and batch 8 no
        # faster. Constant lr: the model starts reading the image after 200-400 steps, where a cosine decay
        # has already cut the lr (36.7% against 44.7% after 400 steps; bench/RESULTS_learnability.md).
        optim=OptimSpec(lr=5e-4, global_batch_size=16, warmup_ratio=0.03, schedule="constant"),
        scaling=ScalingSpec(num_workers=2, cpus_per_worker=0.5, precision="fp32", zero_stage=2),
        # Every 50 steps: 12 DeepSpeed checkpoints in the demo's 600-step stage instead of 60.
        checkpoint=CheckpointSpec(every_n_steps=50),
    )


def _llava_1_5(name: str, preset: str, stage: int, stage2_zero: int) -> TrainConfig:
    # The paper's hyper-parameters (LLaVA-1.5 scripts): 8 GPUs, per-device batch 32 (stage 1) / 16
    # (stage 2), no accumulation; `model.llm_path` / `model.vision_path` / `data.*` point at local copies of
    # Vicuna-v1.5, CLIP ViT-L/14-336, LCS-558K and llava_v1_5_mix665k (set them with --set).
    scaling = dict(num_workers=8, use_gpu=True, cpus_per_worker=8.0, precision="bf16")
    if stage == 1:
        return TrainConfig(
            recipe=name, stage=1,
            model=ModelSpec(preset=preset, init="components", llm_path="<vicuna>", vision_path="<clip>",
                            compressor="none", gradient_checkpointing=True),
            data=DataSpec(annotations="<blip_laion_cc_sbu_558k.json>", image_root="<images>", tokenizer="<tokenizer>",
                          template="plain", max_length=2048, micro_batch_size=32),
            optim=OptimSpec(lr=1e-3, global_batch_size=256, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0),
            scaling=ScalingSpec(zero_stage=2, **scaling),
            checkpoint=CheckpointSpec(every_n_steps=500),
        )
    return TrainConfig(
        recipe=name, stage=2,
        model=ModelSpec(preset=preset, init="components", llm_path="<vicuna>", vision_path="<clip>",
                        projector_path=STAGE1_OUTPUT, compressor="dpn", gradient_checkpointing=True),
        data=DataSpec(annotations="<llava_v1_5_mix665k.json>", image_root="<images>", tokenizer="<tokenizer>",
                      template="vicuna_v1", add_router_token=True, max_length=2048, micro_batch_size=16),
        optim=OptimSpec(lr=2e-5, global_batch_size=128, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0),
        scaling=ScalingSpec(zero_stage=stage2_zero, **scaling),
        checkpoint=CheckpointSpec(every_n_steps=500),
    )


def llava_1_5_7b(stage: int) -> TrainConfig:
    """LLaVA-1.5-7B + DPN with the paper's hyper-parameters (ZeRO-2 in both stages)."""
    return _llava_1_5("llava-1.5-7b", "llava-1.5-7b", stage, stage2_zero=2)


def llava_1_5_13b(stage: int) -> TrainConfig:
    """LLaVA-1.5-13B + DPN: as 7B, stage 2 under ZeRO-3 (the 13B weights + states do not fit ZeRO-2)."""
    return _llava_1_5("llava-1.5-13b", "llava-1.5-13b", stage, stage2_zero=3)


def llava_hr_tiny(stage: int) -> TrainConfig:
    """LLaVA-HR in miniature on the synthetic corpus: the tiny recipe on the `llava-hr-tiny` geometry from
    random weights (no stage 0: this recipe checks the HR path end to end, it is not tuned to learn), stage 2
    training the vision tower as LLaVA-HR's stage 2 does."""
    from dataclasses import replace

    base = tiny(stage)
    model = replace(base.model, preset="llava-hr-tiny", vision_path=None, llm_path=None, train_vision_tower=stage == 2)
    return replace(base, recipe="llava-hr-tiny", model=model)


def _llava_hr(name: str, stage: int) -> TrainConfig:
    """LLaVA-1.5's recipe with the reference's HR differences (aihao2000/DPN-LLaVA train_dpn_llava_hr{,_x}.sh):
    stage 2 at per-device batch 8 with accumulation 2 (global 128), model_max_length 2496 (1024 visual tokens),
    ZeRO-3, the vision tower (both branches and the MR-adapters) trained.

    `model.path` is our `save_pretrained` directory of the untrained LLaVA-HR assembled from its parts
    (`dpn convert llava-hr-components`: Vicuna v1.5, CLIP ViT-L/14-336, the timm ConvNeXt). Stage 1 trains
    the projector at 1024 px (LLaVA-HR's ran at 384 px and also trained the final fusion); to start from
    LLaVA-HR's released stage-1 file instead (projector + fusion), set
    model.projector_path=<.../llava-hr-7b-pretrain-384/mm_projector.bin>: stage 1 is then skipped."""
    from dataclasses import replace

    base = _llava_1_5(name, name, stage, stage2_zero=3)
    model = replace(base.model, init="pretrained", path=f"<{name}-base>", llm_path=None, vision_path=None,
                    train_vision_tower=stage == 2)
    if stage == 1:
        return replace(base, model=model)
    return replace(base, model=model, data=replace(base.data, max_length=2496, micro_batch_size=8))


def llava_hr_7b(stage: int) -> TrainConfig:
    """LLaVA-HR-7B (CLIP-L + ConvNeXt-L, Vicuna-7B) + DPN with the reference's hyper-parameters."""
    return _llava_hr("llava-hr-7b", stage)


def llava_hr_x_13b(stage: int) -> TrainConfig:
    """LLaVA-HR-X-13B (CLIP-L + ConvNeXt-XXL, Vicuna-13B) + DPN with the reference's hyper-parameters."""
    return _llava_hr("llava-hr-x-13b", stage)


RECIPES: dict[str, Callable[[int], TrainConfig]] = {
    "tiny": tiny,
    "llava-1.5-7b": llava_1_5_7b,
    "llava-1.5-13b": llava_1_5_13b,
    "llava-hr-tiny": llava_hr_tiny,
    "llava-hr-7b": llava_hr_7b,
    "llava-hr-x-13b": llava_hr_x_13b,
}


def get_recipe(name: str, stage: int, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of recipe `name` for `stage` (1 or 2), with `key.path=value` overrides applied."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    if stage not in STAGES:
        _fail("stage", stage, f"must be one of {list(STAGES)}")
    return apply_overrides(RECIPES[name](stage), overrides)


__all__ = [
    "CheckpointSpec",
    "DataSpec",
    "ModelSpec",
    "OptimSpec",
    "RECIPES",
    "ScalingSpec",
    "TrackingSpec",
    "TrainConfig",
    "VisionPretrainSpec",
    "LLMPretrainSpec",
    "apply_overrides",
    "chain_stage2",
    "check_names",
    "config_from_dict",
    "get_recipe",
    "reads_stage1",
]
