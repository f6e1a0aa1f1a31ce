"""The optimisation schedule of a training stage: step count, learning-rate multiplier (also used by the
stage-0 trainings), the AdamW optimizer and the DeepSpeed config that sets the global batch as
micro-batch x accumulation x workers."""

from __future__ import annotations

import math
from typing import Any

from pipelines.recipes import TrainConfig


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


def build_optimizer(model, cfg: TrainConfig):
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


def total_steps(cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps of the stage: `optim.max_steps`, else ceil(num_epochs * rows / global batch)."""
    if cfg.optim.max_steps is not None:
        return cfg.optim.max_steps
    return max(1, math.ceil(cfg.optim.num_epochs * rows / cfg.optim.global_batch_size))
