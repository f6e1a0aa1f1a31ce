"""The model a training stage starts from: its weights (`build_model`: a preset from random weights with
stage 0's tower / LLM loaded over it, our checkpoint, llava-hf, or separate Vicuna + CLIP + projector),
which parameters train (`set_trainable`), and the ZeRO-3 guard (`check_zero3`); its config is
`pipelines.training.model_config`. Runs on the driver (to check the config) and on every worker (to build
the same weights on each rank).
"""

from __future__ import annotations

import os
from pathlib import Path

from dpn.compressors import POOLING
from pipelines.recipes import TrainConfig
from pipelines.training.model_config import dpn_overrides, model_config


# ----- model ----------------------------------------------------------------------------------------
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
    kw = dpn_overrides(cfg, tokenizer)
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
SKIPPABLE_TRAINABLE = ("routers.", "pool_experts.")


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    """Parameter-name prefixes that train in this stage; everything else is frozen."""
    if cfg.stage == 1:
        # LLaVA-HR's stage 1 trains the final fusion of its two vision branches with the projector; a CLIP
        # tower has no `vision_tower.fusion.` parameters, so the prefix matches nothing there.
        return ("multi_modal_projector.", "vision_tower.fusion.")
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
