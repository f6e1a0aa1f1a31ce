"""Configuration of LLaVA-HR's dual-resolution vision tower (`dpn.vision_hr.LlavaHRVisionModel`).

It is the `vision_config` of a `DPNConfig` whose model is LLaVA-HR: a CLIP ViT low-resolution branch and a
ConvNeXt high-resolution branch fused by mixture-of-resolution adapters (architecture and sources in
`dpn.vision_hr`). It exposes the attributes the rest of the project reads from any vision config, with
the meaning they have there:

    image_size   the model's input resolution (1024): what image processing resizes to;
    patch_size   input pixels per visual token side (1024 / 32 grid = 32), so image_size // patch_size is
                 the (square) token grid the LLM receives, as for CLIP;
    hidden_size  width of the fused features the projector reads (the CLIP branch's: LLaVA-HR's
                 `mm_hidden_size`);
    num_hidden_layers  the CLIP branch's depth.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, ConvNextConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

HR_VISION_MODEL_TYPE = "llava_hr_vision"
# LLaVA-HR splits the CLIP layers into four equal groups; an MR-adapter follows each of the first three.
CLIP_GROUPS = 4

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the low-resolution branch of LLaVA-HR and HR-X.
CLIP_L_336: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)
# timm `convnext_large_mlp` (LAION-2B CLIP weights, `clip_laion2b_ft_320`): LLaVA-HR-7B's high-resolution
# branch. timm's LayerNorms use eps 1e-6 here.
CONVNEXT_LARGE: dict[str, Any] = dict(
    num_stages=4, hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3], patch_size=4,
    hidden_act="gelu", layer_scale_init_value=1e-6, layer_norm_eps=1e-6,
)
# timm `convnext_xxlarge` (`clip_laion2b_soup`): LLaVA-HR-X's; timm builds it with norm_eps=1e-5.
CONVNEXT_XXLARGE: dict[str, Any] = dict(
    num_stages=4, hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3], patch_size=4,
    hidden_act="gelu", layer_scale_init_value=1e-6, layer_norm_eps=1e-5,
)


@strict
class LlavaHRVisionConfig(PreTrainedConfig):
    """LLaVA-HR's vision tower.

    Args:
        clip_config: the low-resolution branch, a `CLIPVisionConfig` at its native resolution (its
            position embeddings are resampled to the branch's working grid at run time, as LLaVA-HR does).
        convnext_config: the high-resolution branch, a `ConvNextConfig`; its `layer_norm_eps` applies to
            every LayerNorm of the branch (timm uses one eps throughout, transformers hard-codes 1e-6
            except in the final norm).
        image_size: input resolution (LLaVA-HR's `input_image_size`, 1024); a multiple of the ConvNeXt's
            total stride (stem patch x 2^(stages-1) = 32).
        mr_adapters: the three mixture-of-resolution adapters between the CLIP groups (LLaVA-HR builds
            them when the vision tower trains, `freeze_vision=False`, as in its stage 2).
        adapter_zero_init: the adapters' output projections start at zero, so a fresh adapter is the
            identity (LLaVA-HR's default).
    """

    model_type = HR_VISION_MODEL_TYPE
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_L_336),
        "convnext_config": SubConfigSpec(config_class=ConvNextConfig, init_kwargs=CONVNEXT_LARGE),
    }

    clip_config: dict | PreTrainedConfig | None = None
    convnext_config: dict | PreTrainedConfig | None = None
    image_size: int = 1024
    mr_adapters: bool = True
    adapter_zero_init: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        clip, cnx = self.clip_config, self.convnext_config
        if clip.num_hidden_layers % CLIP_GROUPS:
            raise ValueError(
                f"clip_config.num_hidden_layers must be a multiple of {CLIP_GROUPS} (LLaVA-HR puts an MR-adapter "
                f"after each quarter of the CLIP layers), got {clip.num_hidden_layers}"
            )
        if len(cnx.hidden_sizes) != cnx.num_stages or len(cnx.depths) != cnx.num_stages:
            raise ValueError(
                f"convnext_config needs one hidden size and depth per stage ({cnx.num_stages}), got "
                f"hidden_sizes={cnx.hidden_sizes}, depths={cnx.depths}"
            )
        if self.image_size < 1 or self.image_size % self.convnext_stride:
            raise ValueError(
                f"image_size must be a positive multiple of the ConvNeXt's total stride {self.convnext_stride}, "
                f"got {self.image_size}"
            )
        slow, fast = self.slow_grid, self.grid
        if fast % slow:
            # LLaVA-HR aligns the two grids by bilinear upsampling of the ConvNeXt map (or average pooling
            # of a larger one); it asserts one token count divides the other.
            raise ValueError(
                f"the CLIP branch's {fast}x{fast} grid must be a multiple of the ConvNeXt's {slow}x{slow} grid "
                f"(image_size {self.image_size}, clip_config.image_size {clip.image_size})"
            )
        if self.image_size % fast:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the token grid side {fast}")

    # ----- derived geometry -------------------------------------------------------------------------
    @property
    def convnext_stride(self) -> int:
        """Input pixels per ConvNeXt output cell: stem patch x 2 per later stage (4 x 8 = 32)."""
        cnx = self.convnext_config
        return cnx.patch_size * 2 ** (cnx.num_stages - 1)

    @property
    def slow_grid(self) -> int:
        """Side of the ConvNeXt branch's output grid (32 at 1024 px)."""
        return self.image_size // self.convnext_stride

    @property
    def clip_image_size(self) -> int:
        """Resolution the CLIP branch runs at: as many 14-px patches as the ConvNeXt has cells, never less
        than CLIP's native size (LLaVA-HR: max(int(image_size / 32 * 14), 336); 448 at 1024 px)."""
        clip = self.clip_config
        return max(self.slow_grid * clip.patch_size, clip.image_size)

    @property
    def grid(self) -> int:
        """Side of the fused token grid the LLM receives (32 at 1024 px: 1024 tokens)."""
        return self.clip_image_size // self.clip_config.patch_size

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid

    @property
    def hidden_size(self) -> int:
        return self.clip_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.clip_config.num_hidden_layers


def is_hr_vision(config: Any) -> bool:
    """Whether a vision config (a `DPNConfig.vision_config`) is LLaVA-HR's dual-resolution tower."""
    return getattr(config, "model_type", None) == HR_VISION_MODEL_TYPE


def hr_vision_config(value: Any) -> Any:
    """`value` as a `LlavaHRVisionConfig` when it is a dict that names this model type (a `config.json`
    read back), else unchanged: `DPNConfig` resolves its other vision configs through `AutoConfig`, which
    does not know this type."""
    if isinstance(value, dict) and value.get("model_type") == HR_VISION_MODEL_TYPE:
        return LlavaHRVisionConfig(**{k: v for k, v in value.items() if k != "model_type"})
    return value


__all__ = [
    "CLIP_L_336",
    "CONVNEXT_LARGE",
    "CONVNEXT_XXLARGE",
    "HR_VISION_MODEL_TYPE",
    "LlavaHRVisionConfig",
    "hr_vision_config",
    "is_hr_vision",
]
