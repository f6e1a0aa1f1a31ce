"""The worker side of a training stage: what every Ray Train worker runs (`train_func`), in the shape of
Ray's DeepSpeed example -- set up, step, report-and-checkpoint, load-checkpoint.

    train_func(loop_config)   build model -> freeze -> DeepSpeed -> [resume] -> steps -> checkpoints via
                              ray.train.report -> final model (+ tokenizer and processor) and projector

Failures: every `checkpoint.every_n_steps` steps each worker saves its DeepSpeed shard into a temporary
directory and passes it to `ray.train.report`, which merges all workers' files into one checkpoint. After
a worker-group restart `train_func` loads the latest checkpoint, skips as many micro-batches as it had
consumed in that epoch and runs to the same `total_steps`, logging into the same MLflow run (its id
travels in the loop config; steps between the last checkpoint and the failure are logged a second
time). Ray Data splits the rows among workers dynamically, so the replayed remainder of the epoch is the
same size, not necessarily the same rows. Each rank writes a checksum manifest of its files into the
checkpoint (`pipelines.publish.write_checksums`), and a resume verifies them all before DeepSpeed
unpickles anything: a corrupt checkpoint fails the stage with the altered files named, never loads.

Data-parallel consistency: micro-batches are single-modality, and a text-only batch skips the vision
tower and projector (a router whose samples are too small to pool is skipped too). `AlignedBatches`
makes all ranks train the same modality at every micro-step; ZeRO <= 2 gives skipped routers a zero
gradient (`_touch`); ZeRO-3 is refused where a router could be skipped
(`pipelines.training.model_setup.check_zero3`). DPN's saving in training is real: the model re-pads each
pyramid stage to its own (shorter) length, so deeper layers run on fewer tokens (`bench/train_step.py`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpn.compressors import format_path
from pipelines.publish import verify_checksums, write_checksums
from pipelines.recipes import TrainConfig, config_from_dict
from pipelines.training.model_setup import SKIPPABLE_TRAINABLE, build_model, set_trainable
from pipelines.training.schedule import build_optimizer, deepspeed_config, lr_factor

STATE_FILE = "train_state.json"  # in every checkpoint: step, epoch, micro-batches consumed, done
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray checkpoint
HF_DIR = "model"  # save_pretrained directory of the final checkpoint / output
PROJECTOR_DIR = "projector"  # multi_modal_projector.safetensors (the stage-1 artifact)


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
        # The one path notation (`dpn.compressors.format_path`): "4-2-1", a DPE that did not pool as "n".
        return format_path([None if j == self.n_exp else factors[j] for j in reversed(digits)])

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
                m[f"routing/mean_compression/layer{layer}"] = v[b + n + k] / v[b + k]
        paths = v[b + 2 * n :]
        routed = sum(paths)
        if routed > 0:
            for code, count in enumerate(paths):
                if count > 0:
                    m[f"routing/path_share/{self.path_name(code)}"] = count / routed
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
    """Write the trained model (HF format, tokenizer and processor included) and the projector into `out` on rank 0.
    Under ZeRO-3 every rank takes part in gathering the partitioned weights first."""
    from safetensors.torch import save_file

    from dpn.loading import save_projector
    from dpn.processing_dpn import DPNProcessor

    state = None
    if cfg.scaling.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # all ranks; the full dict lands on rank 0
    if rank != 0:
        return
    model = engine.module
    model.save_pretrained(str(out / HF_DIR), state_dict=state, safe_serialization=True)
    # The processor (tokenizer files + processor_config.json): `DPNProcessor.from_pretrained(model_dir)`.
    DPNProcessor.from_model_config(model.config, tokenizer, template=cfg.data.template).save_pretrained(str(out / HF_DIR))
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
    optimizer = build_optimizer(model, cfg)
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
            # DeepSpeed unpickles these files (weights_only=False): only ones that match their manifests.
            verify_checksums(d)
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
        p for n, p in engine.module.named_parameters() if p.requires_grad and n.startswith(SKIPPABLE_TRAINABLE)
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
            write_checksums(out, f"rank{rank:05d}")
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
        write_checksums(tmp, f"rank{rank:05d}")  # each rank its own files: Ray merges the directories
        ray.train.report(
            {"step": state["step"], **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step{state['step']:07d}",
        )
