"""Named model geometries. Each is a function returning a `DPNConfig`; keyword overrides go to the
pyramid/LLaVA fields (e.g. `compressor="static"`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import CLIPVisionConfig, ConvNextConfig, LlamaConfig

from dpn.configuration_dpn import DPNConfig
from dpn.configuration_hr import CLIP_L_336, CONVNEXT_LARGE, CONVNEXT_XXLARGE, LlavaHRVisionConfig

# CLIP ViT-L/14-336 as used by LLaVA-1.5: 24 x 24 = 576 patches.
_CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)


def llava_1_5_7b(**overrides: Any) -> DPNConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/336 + Vicuna-7B v1.5 (32 layers, d=4096, FFN 11008), llava-hf vocab."""
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return DPNConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336), text_config=text, image_token_id=32000, **overrides)


def llava_1_5_13b(dpe_placement: str = "reference", **overrides: Any) -> DPNConfig:
    """LLaVA-1.5-13B: CLIP ViT-L/336 + Vicuna-13B v1.5 (40 layers, d=5120, FFN 13824).

    dpe_placement: "reference" puts the DPE layers after decoder layers 7/15/23, as the authors' code
    does for every model; "quarters" at the end of each quarter of the 40 layers (9/19/29), as for 32."""
    if dpe_placement not in ("reference", "quarters"):
        raise ValueError(f"dpe_placement must be 'reference' or 'quarters', got {dpe_placement!r}")
    if dpe_placement == "reference":
        overrides.setdefault("dpe_layers", [7, 15, 23])
    text = LlamaConfig(
        vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return DPNConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336), text_config=text, image_token_id=32000, **overrides)


def tiny(vocab_size: int = 1024, image_token_id: int = 4, pad_token_id: int = 3, **overrides: Any) -> DPNConfig:
    """The embedded default: trains in minutes on 2 CPU cores. 48-px images, 4-px patches -> 12 x 12 = 144
    visual tokens; a 4-layer LLM (DPE layers 0/1/2), d=128. Four layers, not eight: trained from scratch
    on the synthetic corpus, the 4-layer LLM learns at least as much per step (51% against 48% after 800
    steps, bench/RESULTS_learnability.md) at half the cost per step. Token ids are those of
    `dpn.tokenizer.train_tokenizer` (unk 0, bos 1, eos 2, pad 3, <image> 4, <ROUTER> 5)."""
    overrides.setdefault("router_token_id", 5)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=48, patch_size=4, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=pad_token_id,
        bos_token_id=1, eos_token_id=2,
    )
    return DPNConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, **overrides)


def test_tiny(vocab_size: int = 64, image_token_id: int = 60, pad_token_id: int = 0, **overrides: Any) -> DPNConfig:
    """Smallest geometry for unit tests: 16-px images, 2-px patches -> 8 x 8 = 64 visual tokens, 4-layer LLM
    (DPE layers 0/1/2), d=32."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=2, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=pad_token_id,
        bos_token_id=1, eos_token_id=2,
    )
    return DPNConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, **overrides)


# LLaVA-HR's LLMs: Vicuna v1.5 with `dpn.tokenizer`'s `<image>` (32000) and `<ROUTER>` (32001) appended to its
# 32000-token vocabulary; LLaVA pads with unk (0).
def _vicuna(hidden: int, ffn: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32002, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def llava_hr_7b(**overrides: Any) -> DPNConfig:
    """LLaVA-HR-7B (`dpn.vision_hr`): CLIP ViT-L/14-336 (run at 448 px) + ConvNeXt-L (1024 px) fused by
    MR-adapters -> 32 x 32 = 1024 visual tokens; Vicuna-7B v1.5. DPE layers 7/15/23 (the reference's)."""
    overrides.setdefault("router_token_id", 32001)
    vision = LlavaHRVisionConfig(clip_config=CLIP_L_336, convnext_config=CONVNEXT_LARGE, image_size=1024)
    return DPNConfig(vision_config=vision, text_config=_vicuna(4096, 11008, 32, 32), image_token_id=32000, **overrides)


def llava_hr_x_13b(**overrides: Any) -> DPNConfig:
    """LLaVA-HR-X-13B: CLIP ViT-L/14-336 + ConvNeXt-XXL (1024 px) -> 1024 visual tokens; Vicuna-13B v1.5
    (40 layers, d=5120, FFN 13824). DPE layers 7/15/23, as the reference trains it."""
    overrides.setdefault("router_token_id", 32001)
    overrides.setdefault("dpe_layers", [7, 15, 23])
    vision = LlavaHRVisionConfig(clip_config=CLIP_L_336, convnext_config=CONVNEXT_XXLARGE, image_size=1024)
    return DPNConfig(vision_config=vision, text_config=_vicuna(5120, 13824, 40, 40), image_token_id=32000, **overrides)


def llava_hr_tiny(vocab_size: int = 1024, image_token_id: int = 4, pad_token_id: int = 3, **overrides: Any) -> DPNConfig:
    """LLaVA-HR in miniature, for tests and the `llava-hr-tiny` pipeline (seconds on CPU): 64-px images; a
    4-stage ConvNeXt (1-px stem, widths 8/16/24/32) gives an 8 x 8 map; the 4-layer CLIP branch (two heads of
    64, as OpenAI CLIP's; native 24 px with 4-px patches, run at 32 px with its 6 x 6 position table
    resampled to 8 x 8, as LLaVA-HR runs CLIP-336 at 448 px): 8 x 8 = 64 visual tokens, fused by the three
    MR-adapters; a 4-layer LLM (DPE layers 0/1/2), d=64. Token ids as `tiny` (`dpn.tokenizer`)."""
    overrides.setdefault("router_token_id", 5)
    clip = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                            image_size=24, patch_size=4, projection_dim=64)
    convnext = ConvNextConfig(num_stages=4, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], patch_size=1,
                              layer_norm_eps=1e-6)
    vision = LlavaHRVisionConfig(clip_config=clip, convnext_config=convnext, image_size=64)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=pad_token_id,
        bos_token_id=1, eos_token_id=2,
    )
    return DPNConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, **overrides)


# LLM prefill FLOPs saving the paper's abstract and the reference README report for DPN on each family (the
# accounting behind them is not public; `dpn.flops` prints ours beside them).
PAPER_FLOPS_SAVING: dict[str, float] = {"llava-1.5-7b": 0.56, "llava-hr-7b": 0.40, "llava-hr-x-13b": 0.44}

# Not a pytest test, despite its name, when a test module imports it.
test_tiny.__test__ = False  # type: ignore[attr-defined]

PRESETS: dict[str, Callable[..., DPNConfig]] = {
    "llava-1.5-7b": llava_1_5_7b,
    "llava-1.5-13b": llava_1_5_13b,
    "tiny": tiny,
    "test-tiny": test_tiny,
    "llava-hr-7b": llava_hr_7b,
    "llava-hr-x-13b": llava_hr_x_13b,
    "llava-hr-tiny": llava_hr_tiny,
}


def get_preset(name: str, **overrides: Any) -> DPNConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
