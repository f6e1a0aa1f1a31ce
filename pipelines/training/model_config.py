"""The `DPNConfig` a training stage trains (`model_config`: geometry, compressor, token ids), without building
any weights. Preprocessing needs the geometry and the driver checks the config before any worker starts;
kept apart from `model_setup` (weights), so that neither they nor their cache keys (`pipelines.code_keys`)
depend on the modeling code.
"""

from __future__ import annotations

from typing import Any

from pipelines.recipes import TrainConfig


def _token_ids(tokenizer) -> dict[str, int]:
    """Image / router / pad ids of a tokenizer (router only when the tokenizer has `<ROUTER>`)."""
    from dpn.constants import IMAGE_TOKEN, ROUTER_TOKEN

    ids = {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    router = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
    if router is not None and router != tokenizer.unk_token_id:
        ids["router_token_id"] = router
    return ids


def dpn_overrides(cfg: TrainConfig, tokenizer) -> dict[str, Any]:
    """The `DPNConfig` fields the recipe and the tokenizer set over a preset or checkpoint."""
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
    kw = dpn_overrides(cfg, tokenizer)
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


