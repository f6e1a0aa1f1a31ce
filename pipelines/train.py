"""Where a stage is trained: Ray Train `TorchTrainer` workers, each running a DeepSpeed engine.

    driver  run_stage(cfg)                    validate -> data -> MLflow run -> TorchTrainer.fit -> outputs
    worker  train_func(loop_config)           build model -> freeze -> DeepSpeed -> [resume] -> steps ->
                                              checkpoints via ray.train.report -> final model

Stage 1 trains the projector of plain LLaVA-1.5 (vision tower and LLM frozen); stage 2 trains the LLM,
the projector and the fresh DPE routers (and optionally the vision tower) on LM + routing loss (the
model's `loss` is already lm_loss + coef * route_loss). The tiny recipe, which has no CLIP or Vicuna offline,
first runs stage 0 (`pipelines.vision_pretrain` and `pipelines.llm_pretrain`, one Ray task each):
`run_recipe` resolves stage 1's `model.vision_path` / `model.llm_path` "<stage0>" through `resolve_stage0`.

Failures: every `checkpoint.every_n_steps` steps each worker saves its DeepSpeed shard into a temporary
directory and passes it to `ray.train.report`, which merges all workers' files into one checkpoint. A dead
worker makes Ray Train restart the worker group (`FailureConfig.max_failures`); `train_func` then loads
the latest checkpoint, skips as many micro-batches as it had consumed in that epoch and runs to the same
`total_steps`, logging into the same MLflow run (its id travels in the loop config; steps between the
last checkpoint and the failure are logged a second time). Ray Data splits the rows among workers
dynamically, so the replayed remainder of the epoch is the same size, not necessarily the same rows.
The run name and storage path are derived from the config, so re-running the same command after the
driver died makes Ray Train restore the latest checkpoint of that run.

Data-parallel consistency: micro-batches are single-modality, and a text-only batch skips the vision
tower and projector (a router whose samples are too small to pool is skipped too). `AlignedBatches`
makes all ranks train the same modality at every micro-step; ZeRO <= 2 gives skipped routers a zero
gradient (`_touch`); ZeRO-3 is refused where a router could be skipped (`check_zero3`).

CPU and GPU run the same code: on CPU, DS_ACCELERATOR=cpu and gloo; on GPU, NCCL. DPN's saving in
training is real: the model re-pads each pyramid stage to its own (shorter) length, so deeper layers run
on fewer tokens (`bench/train_step.py` measures the step time against the uncompressed baseline).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpn.compressors import POOLING
from pipelines.recipes import STAGE0_OUTPUT, STAGE1_OUTPUT, TrainConfig, config_from_dict, get_recipe

STATE_FILE = "train_state.json"  # in every checkpoint: step, epoch, micro-batches consumed, done
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray checkpoint
HF_DIR = "model"  # save_pretrained directory of the final checkpoint / output
PROJECTOR_DIR = "projector"  # multi_modal_projector.safetensors (the stage-1 artifact)
RESULT_FILE = "result.json"  # written by the driver next to the outputs when a stage is complete
PROGRESS_DIR = "progress"  # per-rank heartbeat files (pid, step), for monitoring and the failure test


# ----- results --------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """What a finished (or skipped) stage produced."""

    recipe: str
    stage: int
    run_name: str
    run_id: str | None  # MLflow run
    model_dir: str | None  # save_pretrained directory (tokenizer included)
    projector_dir: str | None  # holds multi_modal_projector.safetensors
    steps: int  # optimizer steps done
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged values
    storage_path: str | None = None  # Ray Train run folder (checkpoints)
    seconds: float = 0.0
    status: str = "trained"  # "trained" | "cached" (already complete) | "skipped" (projector given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- model --------------------------------------------------------------------------------------
def _token_ids(tokenizer) -> dict[str, int]:
    """Image / router / pad ids of a tokenizer (router only when the tokenizer has `<ROUTER>`)."""
    from dpn.constants import IMAGE_TOKEN, ROUTER_TOKEN

    ids = {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    router = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
    if router is not None and router != tokenizer.unk_token_id:
        ids["router_token_id"] = router
    return ids


def _dpn_overrides(cfg: TrainConfig, tokenizer) -> dict[str, Any]:
    kw: dict[str, Any] = {"compressor": cfg.model.compressor, "router_objective": cfg.model.router_objective,
                          **_token_ids(tokenizer)}
    if cfg.model.route_loss_coef is not None:
        kw["route_loss_coef"] = cfg.model.route_loss_coef
    return kw


def random_vocab_size(preset: str, tokenizer) -> int:
    """Embedding rows of a random `preset` LLM for `tokenizer`: the small presets are sized to the
    tokenizer (at least 64 rows), the LLaVA ones keep their own vocabulary."""
    from dpn.presets import get_preset

    if preset in ("tiny", "test-tiny"):
        return max(len(tokenizer), 64)
    return get_preset(preset).text_config.vocab_size


def model_config(cfg: TrainConfig, tokenizer):
    """The `DPNConfig` the stage trains (no weights built): geometry from the preset or the checkpoint,
    compressor and token ids from the recipe and the tokenizer."""
    from transformers import AutoConfig

    from dpn.configuration_dpn import DPNConfig
    from dpn.presets import get_preset

    m = cfg.model
    kw = _dpn_overrides(cfg, tokenizer)
    if m.init == "random":
        extra = {}
        if m.preset in ("tiny", "test-tiny"):
            extra = {"vocab_size": random_vocab_size(m.preset, tokenizer), "pad_token_id": tokenizer.pad_token_id}
        return get_preset(m.preset, **extra, **kw)
    if m.init == "pretrained":
        return DPNConfig.from_pretrained(m.path, local_files_only=True, **kw)
    if m.init == "llava_hf":
        llava = AutoConfig.from_pretrained(m.path, local_files_only=True)
        return DPNConfig(vision_config=llava.vision_config, text_config=llava.text_config, **kw)
    llm = AutoConfig.from_pretrained(m.llm_path, local_files_only=True)
    vision = AutoConfig.from_pretrained(m.vision_path, local_files_only=True)
    vision = getattr(vision, "vision_config", vision)
    return DPNConfig(vision_config=vision, text_config=llm, **kw)


def build_model(cfg: TrainConfig, tokenizer):
    """Build the stage's starting model on CPU (seeded, so every rank builds the same weights).

    random: the preset from `model.seed` (with `model.vision_path` / `model.llm_path`, that vision tower /
    LLM loaded over the random one: stage 0's, in the tiny recipe); pretrained: our checkpoint (e.g. stage 1's model), DPN
    modules the checkpoint lacks (fresh routers) initialised; llava_hf / components: `dpn.loading`. A
    `model.projector_path` is loaded over the projector. The embeddings grow to the tokenizer if needed.
    """
    import torch

    from dpn.loading import from_components, from_llava_hf, load_language_model, load_vision_tower
    from dpn.modeling_dpn import DPNForConditionalGeneration

    m = cfg.model
    torch.manual_seed(m.seed)
    kw = _dpn_overrides(cfg, tokenizer)
    dtype = torch.bfloat16 if cfg.scaling.precision == "bf16" else None
    if m.init == "random":
        model = DPNForConditionalGeneration(model_config(cfg, tokenizer))
        if m.vision_path:
            load_vision_tower(model, m.vision_path)
        if m.llm_path:
            load_language_model(model, m.llm_path, tokenizer)
    elif m.init == "pretrained":
        model = DPNForConditionalGeneration.from_pretrained(m.path, local_files_only=True, **kw)
        # Modules the checkpoint lacks (stage 1 -> stage 2: routers) start fresh, from the seed.
        for name in ("routers", "pool_experts"):
            if hasattr(model, name) and not _module_in_checkpoint(m.path, name):
                getattr(model, name).apply(model._init_weights)
    elif m.init == "llava_hf":
        model = from_llava_hf(m.path, dtype=dtype, **kw)
    else:
        model = from_components(m.llm_path, m.vision_path, projector_path=None, tokenizer=tokenizer, dtype=dtype,
                                **{k: v for k, v in kw.items() if k not in ("image_token_id", "router_token_id")})
    if m.projector_path:
        load_projector(model, m.projector_path)
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.language_model.resize_token_embeddings(len(tokenizer))
        model.config.text_config.vocab_size = len(tokenizer)
    return model


def _module_in_checkpoint(path: str, prefix: str) -> bool:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            if any(k.startswith(prefix + ".") for k in h.keys()):
                return True
    return False


def load_projector(model, path: str | os.PathLike) -> None:
    """Copy a stage-1 projector (our `multi_modal_projector.safetensors`, or LLaVA's `mm_projector.bin`;
    a file or a directory holding one) into `model.multi_modal_projector`."""
    from dpn.loading import _projector_rename, load_weights

    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("multi_modal_projector.safetensors", "mm_projector.bin", "mm_projector.safetensors")
                 if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"model.projector_path: {p} holds no multi_modal_projector.safetensors or mm_projector.bin")
        p = found[0]
    load_weights(model, [p], _projector_rename, required_prefixes=("multi_modal_projector.",))


# Trainable modules a rank may skip in a micro-batch even when all ranks train the same modality: a
# router (and its pooling experts) whose samples all have too few visual tokens left is not called.
_SKIPPABLE_TRAINABLE = ("routers.", "pool_experts.")


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    """Parameter-name prefixes that train in this stage; everything else is frozen."""
    if cfg.stage == 1:
        return ("multi_modal_projector.",)
    prefixes = ["multi_modal_projector.", "language_model.", "routers.", "pool_experts."]
    if cfg.model.train_vision_tower:
        prefixes.append("vision_tower.")
    return tuple(prefixes)


def set_trainable(model, cfg: TrainConfig) -> dict[str, int]:
    """Freeze everything but the stage's trainable parts. Returns parameter counts (trainable / total)."""
    prefixes = trainable_prefixes(cfg)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"stage {cfg.stage}: no parameter matches the trainable prefixes {prefixes}")
    return {"trainable": trainable, "total": total}


def check_zero3(cfg: TrainConfig, model_cfg) -> None:
    """Under ZeRO-3 calling a module all-gathers its parameters (a collective), so every rank must call
    the same modules in every micro-batch. Modality is aligned across ranks (`AlignedBatches`); what is
    left is that every image sample must reach every router, i.e. stay poolable at every DPE even after
    the strongest compression at each earlier one, and no expert may own parameters (conv pooling calls
    only the chosen expert). Raises ValueError naming the field otherwise (before any worker starts)."""
    if cfg.scaling.zero_stage != 3 or model_cfg.compressor not in POOLING:
        return
    if model_cfg.pool == "conv":
        raise ValueError("scaling.zero_stage: 3 cannot train conv pooling experts (a rank calls only the chosen "
                         "expert's conv); use ZeRO-2 or pool='max'/'avg'")
    if model_cfg.compressor != "dpn":
        return
    tokens, worst = model_cfg.num_image_tokens, max(model_cfg.expert_factors)
    for k, layer in enumerate(model_cfg.dpe_layers):
        if tokens < model_cfg.min_tokens_to_pool:
            raise ValueError(
                f"scaling.zero_stage: 3 needs every image sample to reach every router, but with "
                f"{model_cfg.num_image_tokens} visual tokens a sample can arrive at DPE {k} (layer {layer}) with "
                f"{tokens} < min_tokens_to_pool={model_cfg.min_tokens_to_pool} tokens and skip it; use ZeRO-2 for "
                "this geometry (LLaVA-1.5's 576 tokens leave at least 36)"
            )
        tokens //= worst


# ----- optimisation -------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup over
    ceil(warmup_ratio * total) steps, then cosine / linear decay to 0 or constant."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config of one stage: the global batch as micro-batch x accumulation x workers."""
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage}
    if cfg.scaling.zero_stage == 3:
        # The final model is saved from a consolidated state dict: gather the partitions on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.scaling.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    accum = cfg.optim.global_batch_size // (cfg.data.micro_batch_size * world_size)
    return {
        "train_batch_size": cfg.optim.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.scaling.precision == "bf16"},
        # Our client optimizer is torch's AdamW (DeepSpeed's fused/CPU Adam would compile ops first).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(model, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # No weight decay on biases and norms (1-D tensors), as HF Trainer does.
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


# ----- per-step statistics ------------------------------------------------------------------------
class StepStats:
    """Accumulates one optimizer step's micro-batches on one worker; `reduce()` sums them over all
    workers (one all-reduce) and returns the step's metrics.

    Router paths are encoded as base-(E+1) numbers of the expert index per DPE (E = not pooled), so
    every worker's path histogram fits one fixed-size vector.
    """

    def __init__(self, model_cfg):
        self.cfg = model_cfg
        self.n_dpe = len(model_cfg.dpe_layers)
        self.n_exp = len(model_cfg.experts)
        self.n_paths = (self.n_exp + 1) ** self.n_dpe
        # samples, tokens, lm_loss*labels, labels, route_loss sum, micro-batches with a route loss,
        # tflops, baseline tflops, image samples, routed samples per DPE, factor sums per DPE, paths
        self._base = 9
        self.vec = [0.0] * (self._base + 2 * self.n_dpe + self.n_paths)

    def add(self, batch: dict, out) -> None:
        from dpn.flops import llm_prefill_flops

        tc = self.cfg.text_config
        mask = batch["attention_mask"]
        n_labels = int(out.num_label_tokens) if out.num_label_tokens is not None else 0
        v = self.vec
        v[0] += mask.shape[0]
        v[1] += float(mask.sum())
        if out.lm_loss is not None:
            v[2] += float(out.lm_loss.detach()) * n_labels
            v[3] += n_labels
        if out.route_loss is not None:
            v[4] += float(out.route_loss.detach())
            v[5] += 1
        vis = out.visual_tokens_per_layer.tolist()
        txt = out.text_tokens_per_layer.tolist()
        for vs, ts in zip(vis, txt, strict=True):
            v[6] += llm_prefill_flops(tc, [a + b for a, b in zip(vs, ts, strict=True)]) / 1e12
            # The uncompressed baseline on the same input: every layer sees layer 0's tokens.
            v[7] += llm_prefill_flops(tc, [vs[0] + ts[0]] * len(vs)) / 1e12
            v[8] += 1 if vs[0] > 0 else 0
        if out.routing_paths is not None and self.n_dpe:
            factors = self.cfg.expert_factors
            for row in out.routing_paths.tolist():
                if all(j < 0 for j in row):
                    continue  # never pooled (text-only, or too few visual tokens): not a routing decision
                code = 0
                for k, j in enumerate(row):
                    code = code * (self.n_exp + 1) + (j if j >= 0 else self.n_exp)
                    if j >= 0:
                        v[self._base + k] += 1
                        v[self._base + self.n_dpe + k] += factors[j]
                v[self._base + 2 * self.n_dpe + code] += 1

    def path_name(self, code: int) -> str:
        digits = []
        for _ in range(self.n_dpe):
            digits.append(code % (self.n_exp + 1))
            code //= self.n_exp + 1
        factors = self.cfg.expert_factors
        return "-".join("x" if j == self.n_exp else str(factors[j]) for j in reversed(digits))

    def reduce(self, device) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(self.vec, dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        v = t.tolist()
        m: dict[str, float] = {"train/samples": v[0], "train/tokens": v[1]}
        if v[3] > 0:
            m["loss/lm"] = v[2] / v[3]
        if v[5] > 0:
            m["loss/route"] = v[4] / v[5]
        if v[0] > 0:
            m["flops/prefill_tflops_per_sample"] = v[6] / v[0]
            m["flops/saving"] = 1.0 - v[6] / v[7] if v[7] > 0 else 0.0
            m["data/image_share"] = v[8] / v[0]
        b, n = self._base, self.n_dpe
        for k, layer in enumerate(self.cfg.dpe_layers):
            if v[b + k] > 0:
                m[f"router/mean_compression/layer{layer}"] = v[b + n + k] / v[b + k]
        paths = v[b + 2 * n :]
        routed = sum(paths)
        if routed > 0:
            for code, count in enumerate(paths):
                if count > 0:
                    m[f"router/path_share/{self.path_name(code)}"] = count / routed
        return m


# ----- data ---------------------------------------------------------------------------------------
def _micro_batches(shard, info, cfg: TrainConfig, epoch: int) -> Iterator[dict]:
    """One epoch of this worker's micro-batches from its Ray Data shard, modality- and length-grouped by
    `pipelines.data.loader` (dicts of tensors as `dpn.collate.collate` returns them)."""
    from pipelines.data.loader import iter_micro_batches

    return iter(iter_micro_batches(
        shard, info, micro_batch_size=cfg.data.micro_batch_size, seed=cfg.model.seed, epoch=epoch,
        group_by_length=cfg.data.group_by_length,
        # Full micro-batches only: the global batch stays what the recipe says (the loader's carry-over
        # already makes every micro-batch but a modality's last one full).
        drop_last=True,
    ))


class AlignedBatches:
    """A worker's micro-batches, handed out so that at every micro-step ALL ranks train the same modality.

    Why: micro-batches are single-modality, and a text-only batch never runs the vision tower or the
    projector. Under ZeRO-3 every module call all-gathers its parameters, a collective; if rank 0 ran
    an image batch while rank 1 ran a text batch, the ranks would wait on different collectives forever.
    Each rank keeps a small look-ahead queue per modality (at most `lookahead` batches); every micro-step
    one all-reduce tells which modalities every rank has ready: text when all have text (text batches are
    the rarer ones), else image when all have images, else the epoch ends for everyone.
    """

    def __init__(self, batches: Iterator[dict], device, lookahead: int = 16):
        from collections import deque

        self._it = batches
        self._device = device
        self._lookahead = lookahead
        self._queues: dict[bool, Any] = {True: deque(), False: deque()}  # has image -> batches
        self._exhausted = False

    def _fill(self) -> None:
        q = self._queues
        while not self._exhausted and not (q[True] and q[False]) and len(q[True]) + len(q[False]) < self._lookahead:
            batch = next(self._it, None)
            if batch is None:
                self._exhausted = True
            else:
                q["pixel_values" in batch].append(batch)

    def next(self) -> dict | None:
        """The next micro-batch (same modality on every rank), or None on every rank at the epoch's end.
        Collective: every rank must call it the same number of times."""
        import torch
        import torch.distributed as dist

        self._fill()
        ready = torch.tensor([float(bool(self._queues[True])), float(bool(self._queues[False]))], device=self._device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ready, op=dist.ReduceOp.MIN)
        if ready[1].item() > 0:
            return self._queues[False].popleft()
        if ready[0].item() > 0:
            return self._queues[True].popleft()
        return None


# ----- the worker ---------------------------------------------------------------------------------
def _set_worker_env(cfg: TrainConfig) -> None:
    # Must precede the first `import deepspeed` of this process: the accelerator is chosen at import.
    if not cfg.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _write_progress(progress_dir: Path, rank: int, **fields: Any) -> None:
    progress_dir.mkdir(parents=True, exist_ok=True)
    tmp = progress_dir / f".rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(), **fields}))
    os.replace(tmp, progress_dir / f"rank{rank}.json")


def _save_final(engine, cfg: TrainConfig, tokenizer, out: Path, rank: int) -> None:
    """Write the trained model (HF format, tokenizer included) and the projector into `out` on rank 0.
    Under ZeRO-3 every rank takes part in gathering the partitioned weights first."""
    from safetensors.torch import save_file

    from dpn.loading import save_projector

    state = None
    if cfg.scaling.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # all ranks; the full dict lands on rank 0
    if rank != 0:
        return
    model = engine.module
    model.save_pretrained(str(out / HF_DIR), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out / HF_DIR))
    if state is None:
        save_projector(model, out / PROJECTOR_DIR)
    else:
        (out / PROJECTOR_DIR).mkdir(parents=True, exist_ok=True)
        proj = {k: v.contiguous() for k, v in state.items() if k.startswith("multi_modal_projector.")}
        save_file(proj, str(out / PROJECTOR_DIR / "multi_modal_projector.safetensors"))


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point (lives in the installed package so workers can unpickle it).

    loop_config: {"train": TrainConfig.to_dict(), "tokenizer": dir, "shards": preprocessed run dir,
    "total_steps": int, "run_id": MLflow run id or None, "tracking_uri": str, "progress_dir": str}.
    """
    cfg = config_from_dict(loop_config["train"])
    _set_worker_env(cfg)
    import ray.train

    from pipelines.data.loader import open_shards
    from pipelines.tracking import RunTracker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total_steps = int(loop_config["total_steps"])
    progress_dir = Path(loop_config["progress_dir"])
    tracker = RunTracker.open(run_id=loop_config.get("run_id"), tracking_uri=loop_config.get("tracking_uri"),
                              enabled=rank == 0 and bool(loop_config.get("run_id")))

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "done": False}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
    if state.get("done"):
        # The stage already finished (the driver died after the final report): nothing to train.
        tracker.finish("FINISHED")
        return

    engine, tokenizer, frozen, maybe_unused = _setup_engine(cfg, loop_config["tokenizer"], world, total_steps,
                                                            checkpoint)
    resumed_from = state["step"] if checkpoint is not None else None
    accum = deepspeed_config(cfg, world)["gradient_accumulation_steps"]
    if rank == 0:
        tracker.set_tags({"dpn.world_size": world, "dpn.grad_accum_steps": accum})
        if cfg.tracking.system_metrics:
            tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s)
        if resumed_from is not None:
            tracker.log_metrics({"train/resumed_from_step": resumed_from}, step=resumed_from)
    _write_progress(progress_dir, rank, step=state["step"], resumed_from=resumed_from, total_steps=total_steps)

    shard = ray.train.get_dataset_shard("train")
    info = open_shards(loop_config["shards"])
    metrics: dict[str, float] = {}
    while state["step"] < total_steps:
        batches = AlignedBatches(_micro_batches(shard, info, cfg, state["epoch"]), engine.device)
        resumed_mid_epoch = state["batches_in_epoch"] > 0
        for _ in range(state["batches_in_epoch"]):  # resume mid-epoch: skip as many as the checkpoint covered
            batches.next()
        steps_this_epoch = 0
        while state["step"] < total_steps:
            t0 = time.perf_counter()
            # Workers may hold different numbers of micro-batches (modality split, grouping): the epoch
            # ends for everyone as soon as the ranks no longer share a ready batch.
            group = [batches.next() for _ in range(accum)]
            if any(b is None for b in group):
                break
            metrics = _train_step(engine, group, maybe_unused, t0)
            state["step"] += 1
            state["batches_in_epoch"] += accum
            steps_this_epoch += 1
            metrics["train/epoch"] = float(state["epoch"])
            if state["step"] % cfg.tracking.log_every_n_steps == 0 or state["step"] == total_steps:
                tracker.log_metrics(metrics, step=state["step"])
            _write_progress(progress_dir, rank, step=state["step"], resumed_from=resumed_from, total_steps=total_steps)
            if state["step"] % cfg.checkpoint.every_n_steps == 0 and state["step"] < total_steps:
                _report_checkpoint(engine, state, metrics, rank, frozen)
        if state["step"] < total_steps:
            if steps_this_epoch == 0 and not resumed_mid_epoch:
                raise RuntimeError(
                    f"epoch {state['epoch']}: a worker holds fewer than {accum} micro-batches, not one optimizer "
                    f"step: the dataset is too small for optim.global_batch_size={cfg.optim.global_batch_size}"
                )
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    _report_final(engine, cfg, tokenizer, state, metrics, rank, tracker)


def _setup_engine(cfg: TrainConfig, tokenizer_dir: str, world: int, total_steps: int, checkpoint):
    """Build the model, freeze what this stage does not train, wrap it in a DeepSpeed engine and, when
    resuming, load the checkpoint's DeepSpeed state. Returns (engine, tokenizer, whether some parameters
    are frozen, the trainable parameters a micro-batch may leave without a gradient)."""
    import deepspeed
    import torch

    from dpn.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer)
    counts = set_trainable(model, cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule)
    )
    _skip_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world)
    )
    frozen = counts["trainable"] < counts["total"]
    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # Frozen weights are not in the checkpoint (stage 1 would otherwise store the whole LLM each
            # time); they come from the same seeded build as the first attempt.
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=not frozen)
            step = json.loads((Path(d) / STATE_FILE).read_text())["step"]
    # Router sampling differs per rank and per resume; the model init above was identical on every rank.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(cfg.model.seed * 100_003 + rank * 7919 + step)
    # ZeRO-3 needs no touching (and could not sum partitioned tensors): `check_zero3` guarantees every
    # image micro-batch calls every router, and AlignedBatches that all ranks train the same modality.
    maybe_unused = [
        p for n, p in engine.module.named_parameters() if p.requires_grad and n.startswith(_SKIPPABLE_TRAINABLE)
    ] if cfg.scaling.zero_stage < 3 else []
    return engine, tokenizer, frozen, maybe_unused


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from loading its shared-memory comm op. Its torch backend JIT-builds/loads the op
    (used only by `inference_all_reduce`, never by training over gloo or NCCL) under a file lock in
    TORCH_EXTENSIONS_DIR; a worker killed inside that window (a stopped job, a failed-worker restart)
    leaves the lock behind and every later DeepSpeed start on the machine then waits on it forever
    (seen: a resumed pipeline hung in `FileBaton.wait`). Marked incompatible, the op is never loaded."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _train_step(engine, group: list[dict], maybe_unused: list, t0: float) -> dict[str, float]:
    """One optimizer step over this worker's `group` of micro-batches (gradient accumulation inside the
    engine); returns the step's metrics, reduced over all workers."""
    device = engine.device
    lr = float(engine.get_lr()[0])  # the lr this step applies (the scheduler moves on in step())
    model_cfg = engine.module.config
    stats = StepStats(model_cfg)
    for batch in group:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = engine(**batch, return_logits=False)
        engine.backward(out.loss + _touch(maybe_unused))
        engine.step()
        stats.add(batch, out)
    step_time = time.perf_counter() - t0
    metrics = stats.reduce(device)
    grad_norm = engine.get_global_grad_norm()
    metrics.update({
        "lr": lr,
        "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "throughput/samples_per_s": metrics["train/samples"] / step_time,
        "throughput/tokens_per_s": metrics["train/tokens"] / step_time,
        "time/step_s": step_time,
    })
    if "loss/lm" in metrics:
        metrics["loss/total"] = metrics["loss/lm"] + model_cfg.route_loss_coef * metrics.get("loss/route", 0.0)
    return metrics


def _report_final(engine, cfg: TrainConfig, tokenizer, state: dict, metrics: dict, rank: int, tracker) -> None:
    """The trained model in HF format (+ projector), logged to MLflow and reported as the last checkpoint
    (no optimizer state: a finished stage is never resumed, only read)."""
    import ray.train

    state["done"] = True
    with tempfile.TemporaryDirectory(prefix="dpn-final-") as tmp:
        out = Path(tmp)
        _save_final(engine, cfg, tokenizer, out, rank)
        if rank == 0:
            (out / STATE_FILE).write_text(json.dumps({**state, "metrics": metrics}))
            tracker.log_model_dir(out / HF_DIR, artifact_path=HF_DIR)
            tracker.log_artifacts(out / PROJECTOR_DIR, artifact_path=PROJECTOR_DIR)
            tracker.finish("FINISHED")
        ray.train.report(
            {"step": state["step"], **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
            checkpoint_dir_name=f"final_step{state['step']:07d}",
        )


def _touch(params) -> Any:
    """0 * sum(params): gives every parameter a (zero) gradient. ZeRO's gradient reduction is a collective
    over fixed buckets, so all ranks must produce gradients for the same parameters in every backward; a
    router that pooled no sample on one rank would otherwise leave the ranks' buckets mismatched."""
    if not params:
        return 0.0
    return sum(p.sum() for p in params) * 0.0


def _report_checkpoint(engine, state: dict, metrics: dict, rank: int, frozen: bool) -> None:
    """Every worker writes its DeepSpeed shard; Ray merges them into one checkpoint directory."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="dpn-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=frozen)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(
            {"step": state["step"], **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step{state['step']:07d}",
        )


# ----- the driver ---------------------------------------------------------------------------------
@dataclass
class StageData:
    """The data a stage trains on."""

    shards: str  # Parquet shard directory
    tokenizer: str  # tokenizer directory
    rows: int
    manifest: dict[str, Any]


def prepare_data(cfg: TrainConfig) -> StageData:
    """Resolve the stage's Parquet shards: as given (`data.shards`), or preprocessed from `data.annotations`
    / the synthetic corpus (generated first when missing); preprocessing is cached by content fingerprint."""
    from pipelines.data.loader import open_shards
    from pipelines.preprocess import PreprocessConfig, preprocess

    d = cfg.data
    if d.shards:
        info = open_shards(d.shards)
        return StageData(info.path, str(d.tokenizer), info.rows, info.manifest)
    if d.synthetic:
        corpus = _synthetic_corpus(cfg)
        annotations = corpus / ("pretrain.json" if cfg.stage == 1 else "instruct.json")
        image_root, tokenizer = corpus / "images", corpus / "tokenizer"
    else:
        annotations, image_root, tokenizer = Path(d.annotations), Path(d.image_root), Path(d.tokenizer)
    from dpn.tokenizer import load_tokenizer

    mcfg = model_config(cfg, load_tokenizer(tokenizer))
    summary = preprocess(PreprocessConfig(
        annotations=str(annotations), image_root=str(image_root), tokenizer=str(tokenizer), template=d.template,
        out=str(_work_dir(cfg) / "preprocessed" / d.template), image_size=mcfg.vision_config.image_size,
        num_image_tokens=mcfg.num_image_tokens, add_router_token=d.add_router_token, max_length=d.max_length,
    ))
    if summary.rows_out == 0:
        raise ValueError(f"data: preprocessing {annotations} left no valid record (quarantined: {summary.quarantined})")
    info = open_shards(summary.path)
    return StageData(info.path, str(tokenizer), info.rows, info.manifest)


def _synthetic_corpus(cfg: TrainConfig) -> Path:
    """The synthetic corpus of `data.synth_records` records per split under the work dir (generated once;
    `generate_corpus` reuses a complete corpus of the same config)."""
    from pipelines.synth import generate_corpus

    n = cfg.data.synth_records
    out = _work_dir(cfg) / f"synth-{n}"
    generate_corpus(out, seed=cfg.model.seed, n_pretrain=n, n_instruct=n, n_eval=15)
    return out


def total_steps(cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps of the stage: `optim.max_steps`, else ceil(num_epochs * rows / global batch)."""
    if cfg.optim.max_steps is not None:
        return cfg.optim.max_steps
    return max(1, math.ceil(cfg.optim.num_epochs * rows / cfg.optim.global_batch_size))


def _work_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.work_dir).absolute()


def run_stage(
    cfg: TrainConfig,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    out_dir: str | os.PathLike | None = None,
    storage_dir: str | os.PathLike | None = None,
) -> StageResult:
    """Train one stage with Ray Train + DeepSpeed and return what it produced.

    Args:
        cfg: the stage config (validated at construction; paths are checked here before Ray starts).
        run_id: log into this existing MLflow run (e.g. the pipeline step's run); otherwise the run is
            found by the config's run name (resumed) or created, as a child of `parent_run_id`
            (default $DPN_PARENT_RUN_ID).
        out_dir: where the model (`model/`) and projector (`projector/`) are published; default
            <work_dir>/train/<run name>.
        storage_dir: Ray Train storage root (checkpoints); default <work_dir>/ray. Re-running with the same
            config and storage resumes from the latest checkpoint.
    Returns:
        StageResult. A stage whose outputs are already complete returns status "cached" without training;
        a stage 1 whose `model.projector_path` exists returns status "skipped".
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data.loader import open_shards, read_shards
    from pipelines.tracking import RunTracker, flatten_params, resolve_parent_run_id, resolve_tracking_uri

    t0 = time.time()
    name = cfg.resolved_run_name()
    out = Path(out_dir).absolute() if out_dir else _work_dir(cfg) / "train" / name
    if cfg.stage == 1 and cfg.model.projector_path and Path(cfg.model.projector_path).exists():
        return StageResult(cfg.recipe, 1, name, None, None, str(Path(cfg.model.projector_path).absolute()), 0, 0,
                           status="skipped")
    for placeholder_field, value in (("model.path", cfg.model.path), ("model.projector_path", cfg.model.projector_path)):
        if value == STAGE1_OUTPUT:
            raise ValueError(f"{placeholder_field}: {STAGE1_OUTPUT!r} stands for stage 1's output; run both stages "
                             "(`dpn train --recipe NAME`) or set it to a directory")
    for field_name in ("vision_path", "llm_path"):  # (`name` is the run name here)
        if getattr(cfg.model, field_name) == STAGE0_OUTPUT:
            raise ValueError(f"model.{field_name}: {STAGE0_OUTPUT!r} stands for stage 0's output; run the recipe "
                             "(`dpn train --recipe NAME`, which runs stage 0 first) or set it to a directory")
    cfg.check_paths()
    done = out / RESULT_FILE
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("fingerprint") == cfg.fingerprint():
            res = StageResult(**cached["result"])
            res.status = "cached"
            return res

    data = prepare_data(cfg)
    from dpn.tokenizer import load_tokenizer

    check_zero3(cfg, model_config(cfg, load_tokenizer(data.tokenizer)))
    steps = total_steps(cfg, data.rows)
    storage = Path(storage_dir).absolute() if storage_dir else _work_dir(cfg) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    progress_dir = storage / name / PROGRESS_DIR

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, _work_dir(cfg))
    tracker = RunTracker.open(
        tracking_uri=uri, work_dir=_work_dir(cfg), experiment=cfg.tracking.experiment, run_name=name,
        run_id=run_id, run_key=None if run_id else name, parent_run_id=resolve_parent_run_id(parent_run_id),
        tags={"dpn.stage": cfg.stage, "dpn.recipe": cfg.recipe, "dpn.run_name": name},
    )
    tracker.log_params({**flatten_params(cfg), "derived.total_steps": str(steps),
                        "derived.grad_accum_steps": str(cfg.grad_accum_steps),
                        "derived.train_rows": str(data.rows), "derived.fingerprint": cfg.fingerprint()})
    tracker.log_dict(cfg.to_dict(), "config/train.json")
    tracker.log_dataset(data.manifest, name=f"{cfg.recipe}-stage{cfg.stage}-{cfg.data.template}",
                        source=data.shards, context="training")

    if not ray.is_initialized():
        ray.init()
    info = open_shards(data.shards)
    # Only the columns the batches need; Ray Train splits the stream among the workers.
    train_ds = read_shards(info, columns=["index", "modality", "length", "input_ids", "labels", info.image_column])
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "train": cfg.to_dict(), "tokenizer": data.tokenizer, "shards": data.shards, "total_steps": steps, "run_id": tracker.run_id,
            "tracking_uri": uri, "progress_dir": str(progress_dir),
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
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    if result.checkpoint is None:
        tracker.finish("FAILED")
        raise RuntimeError(f"stage {cfg.stage} ({name}) ended without a final checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        final_state = json.loads((Path(d) / STATE_FILE).read_text())
        if not final_state.get("done"):
            raise RuntimeError(f"stage {cfg.stage} ({name}): the last checkpoint is not final ({final_state})")
        for sub in (HF_DIR, PROJECTOR_DIR):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
            shutil.copytree(Path(d) / sub, out / sub)
    res = StageResult(
        recipe=cfg.recipe, stage=cfg.stage, run_name=name, run_id=tracker.run_id, model_dir=str(out / HF_DIR),
        projector_dir=str(out / PROJECTOR_DIR), steps=int(final_state["step"]), total_steps=steps,
        metrics={k: float(v) for k, v in final_state.get("metrics", {}).items()},
        storage_path=str(storage / name), seconds=time.time() - t0,
    )
    (out / RESULT_FILE).write_text(json.dumps({"fingerprint": cfg.fingerprint(), "result": res.to_dict()}, indent=2))
    return res


def chain_stage2(stage2: TrainConfig, stage1_result: StageResult) -> TrainConfig:
    """Point a stage-2 config's `<stage1>` placeholders at stage 1's outputs."""
    from dataclasses import replace

    model = stage2.model
    if model.path == STAGE1_OUTPUT:
        if not stage1_result.model_dir:
            raise ValueError("model.path: stage 1 was skipped (a projector was given), so it has no full model to "
                             "start stage 2 from; set model.path or model.init")
        model = replace(model, path=stage1_result.model_dir)
    if model.projector_path == STAGE1_OUTPUT:
        model = replace(model, projector_path=stage1_result.projector_dir)
    return replace(stage2, model=model)


def stage_tokenizer(cfg: TrainConfig) -> Path:
    """The tokenizer directory the stage trains with: `data.tokenizer`, or the synthetic corpus' (generated
    first when missing)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.data.synthetic:
        return _synthetic_corpus(cfg) / "tokenizer"
    raise ValueError("data.tokenizer: required unless data.synthetic is true, got None")


def resolve_stage0(cfg: TrainConfig, parent_run_id: str | None = None) -> TrainConfig:
    """Run stage 0 (cached) for each of stage 1's `model.vision_path` / `model.llm_path` that is "<stage0>"
    and point it at the trained tower / LLM; any other config is returned unchanged. The two are
    independent one-CPU Ray tasks and run side by side; a fresh one is logged as its own MLflow run."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from pipelines.llm_pretrain import run_llm_pretrain
    from pipelines.vision_pretrain import run_vision_pretrain

    parts = {}  # field -> (part, run key prefix, the stage's runner)
    if cfg.model.vision_path == STAGE0_OUTPUT:
        parts["vision_path"] = ("vision", "stage0", lambda: run_vision_pretrain(cfg))
    if cfg.model.llm_path == STAGE0_OUTPUT:
        tokenizer = stage_tokenizer(cfg)
        parts["llm_path"] = ("llm", "stage0-llm", lambda: run_llm_pretrain(cfg, tokenizer))
    if not parts:
        return cfg
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:  # threads only wait on the Ray tasks
        futures = {name: pool.submit(run) for name, (_, _, run) in parts.items()}
        done = {name: future.result() for name, future in futures.items()}
    model = cfg.model
    for name, (out, summary, cached) in done.items():
        part, key, _ = parts[name]
        if not cached:
            log_stage0(part, summary, cfg, run_key=f"{cfg.recipe}-{key}-{out.name}", parent_run_id=parent_run_id)
        model = replace(model, **{name: str(out)})
    return replace(cfg, model=model)


# What each stage-0 part logs: its spec section and the per-evaluation metrics (`stage0/*`).
_STAGE0_METRICS = {
    "vision": ("vision_pretrain", {"stage0/color_accuracy_pct": "color_accuracy_pct",
                                   "stage0/shape_accuracy_pct": "shape_accuracy_pct", "stage0/loss": "loss"}),
    "llm": ("llm_pretrain", {"stage0/llm_accuracy_pct": "accuracy_pct",
                             "stage0/llm_bare_accuracy_pct": "bare_accuracy_pct", "stage0/llm_loss": "loss"}),
}


def log_stage0(part: str, summary: dict[str, Any], cfg: TrainConfig, *, run_id: str | None = None,
               run_key: str | None = None, parent_run_id: str | None = None) -> None:
    """Stage 0's `part` ("vision" or "llm"): params and per-evaluation metrics (with step=) in one MLflow run."""
    from pipelines.tracking import RunTracker, flatten_params, resolve_parent_run_id, resolve_tracking_uri

    section, metrics = _STAGE0_METRICS[part]
    tracker = RunTracker.open(
        tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri, _work_dir(cfg)), work_dir=_work_dir(cfg),
        experiment=cfg.tracking.experiment, run_name=run_key, run_id=run_id, run_key=None if run_id else run_key,
        parent_run_id=resolve_parent_run_id(parent_run_id),
        tags={"dpn.stage": 0, "dpn.stage0_part": part, "dpn.recipe": cfg.recipe},
    )
    tracker.log_params(flatten_params({section: getattr(cfg, section), "model.preset": cfg.model.preset}))
    for row in summary["evals"]:
        tracker.log_metrics({**{key: row[field] for key, field in metrics.items()}, "time/seconds": row["seconds"]},
                            step=row["step"])
    if part == "llm":
        tracker.log_metrics({"stage0/llm_reached_target": float(summary["reached_target"])}, step=summary["steps"])
    if run_id is None:  # a run of our own; the pipeline's step run is finished by the DAG
        tracker.finish("FINISHED")


def run_recipe(
    name: str,
    stages: str = "all",
    overrides: tuple[str, ...] | list[str] = (),
    parent_run_id: str | None = None,
) -> list[StageResult]:
    """Run a recipe's stages ("1", "2" or "all"); stage 2 starts from stage 1's outputs. The same
    overrides apply to both stages. Stage 1 is skipped when stage 2 names an existing projector."""
    if stages not in ("1", "2", "all"):
        raise ValueError(f"stages must be '1', '2' or 'all', got {stages!r}")
    results = []
    if stages in ("1", "all"):
        cfg1 = get_recipe(name, 1, overrides)
        cfg2 = get_recipe(name, 2, overrides) if stages == "all" else None
        given = cfg2.model.projector_path if cfg2 is not None else None
        if given and given != STAGE1_OUTPUT and Path(given).exists():
            results.append(StageResult(name, 1, cfg1.resolved_run_name(), None, None, given, 0, 0, status="skipped"))
        else:
            results.append(run_stage(resolve_stage0(cfg1, parent_run_id), parent_run_id=parent_run_id))
    if stages in ("2", "all"):
        cfg2 = get_recipe(name, 2, overrides)
        if results:
            cfg2 = chain_stage2(cfg2, results[0])
        results.append(run_stage(cfg2, parent_run_id=parent_run_id))
    return results


__all__ = [
    "StageData",
    "StageResult",
    "StepStats",
    "build_model",
    "chain_stage2",
    "deepspeed_config",
    "lr_factor",
    "model_config",
    "log_stage0",
    "prepare_data",
    "random_vocab_size",
    "resolve_stage0",
    "stage_tokenizer",
    "run_recipe",
    "run_stage",
    "set_trainable",
    "total_steps",
    "train_func",
    "trainable_prefixes",
]
