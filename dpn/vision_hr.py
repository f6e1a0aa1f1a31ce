"""LLaVA-HR's dual-resolution vision tower: a CLIP ViT low-resolution branch and a ConvNeXt
high-resolution branch fused by mixture-of-resolution adapters (MR-Adapters), feeding a 32 x 32 = 1024-token
grid to the projector and to the DPN pyramid.

What LLaVA-HR does (read from the authors' code, luogen1996/LLaVA-HR: `llava_hr/model/multimodal_encoder/
multipath_encoder_wapper.py` (`MultiPathCLIPVisionTower`, `S2FStitchAlignModuleV2`, `MultiPathAlignModule`),
`clip_encoder.py`, `convnext_encoder.py`, `convnext.py`, `builder.py`, `llava_arch.py`, `train/train.py`,
`scripts/v1_5/pretrain_llava_hr.sh`, `scripts/v1_5/train_eval_llava_hr.sh`; and from the DPN reference
code built on it, aihao2000/DPN-LLaVA: the same tower with an optional 2x2 "prepooling", `llava_hr/hack/`
with DPE layers 7/15/23 and `MAX_NUM_VISON_TOKENS = 1024`, `scripts/v1_5/train_dpn_llava_hr{,_x}.sh`):

- Config keys (`config.json` of an LLaVA-HR checkpoint, model_type "llava", `LlavaLlamaForCausalLM`):
  `is_multipath_encoder: true`, `mm_vision_tower: openai/clip-vit-large-patch14-336` (the fast, low-res
  branch), `vision_tower_slow: convnext_large_mlp.clip_laion2b_ft_320` (HR-7B) or
  `convnext_xxlarge.clip_laion2b_soup` (HR-X-13B) (the slow, high-res branch, timm names),
  `input_image_size: 1024` (stage 2; stage 1 ran at 384), `freeze_vision: false` (stage 2; the
  MR-adapters exist only then), `mm_projector_type: mlp2x_gelu`, `mm_hidden_size: 1024` (the CLIP width),
  `mm_vision_select_layer: -2` (set, but the multi-path forward does not read it: it runs every CLIP
  layer), `image_aspect_ratio: pad`. The image processor is CLIP's at `input_image_size` (OpenAI mean/std,
  bicubic resize + centre crop, pad to square with the mean colour): one 1024-px image per sample.
- Forward (`MultiPathCLIPVisionTower.forward`), x = (B, 3, 1024, 1024):
  1. Fast branch input: x resized bilinearly (align_corners=True, in fp32) to
     max(int(1024 / 32 * 14), 336) = 448 px; CLIP's patch conv (14 px) gives 32 x 32 patches; CLIP's
     24 x 24 position table is resampled to 32 x 32 (bicubic, antialias, fp32; timm's
     `resample_pos_embed`); the CLS token is dropped BEFORE the encoder (`pre_layrnorm(y[:, 1:])`), so
     every CLIP layer runs on the 1024 patch tokens only.
  2. Slow branch: timm ConvNeXt stem (4x4 conv, LayerNorm) and its four stages on the 1024-px image ->
     (B, C, 32, 32), C = 1536 (ConvNeXt-L) or 3072 (ConvNeXt-XXL). The whole branch runs first; every
     adapter reads its FINAL map (not per-stage maps).
  3. The 24 CLIP layers in four groups of 6; after each of the first three groups an MR-adapter
     (`align_stages_latent[k]`, `S2FStitchAlignModuleV2`) adds high-resolution detail:
        s = slow_proj(GELU(slow_conv(x)))            # 1x1 conv C->C, 1x1 conv C->D, as tokens (B, hw, D)
        s = align(s to the fast grid)                # bilinear up (align_corners) or avg-pool down
        f = f + fast_proj(GELU(fast_conv(f)))        # on the (32, 32) grid: depthwise 7x7, 1x1 conv
        g = gate(mean_tokens(cat[f, s]))             # Linear(2D, D/2), GELU, Linear(D/2, 1), per image
        f = f + s * tanh(g)
     slow_proj / fast_proj start at zero (the adapter starts as the identity), the other convs xavier.
  4. After the last group (no post-layernorm, no layer selection): `align_stages[0]`
     (`MultiPathAlignModule`): out = fast_proj(f) + slow_proj(x as tokens), two Linears into D = 1024.
  5. Projector `mm_projector`: Linear(1024, d) -> GELU -> Linear(d, d) (mlp2x_gelu); 1024 visual tokens
     replace the image placeholder (the LLM sees a 32 x 32 grid, row-major).
- Sizes: CLIP ViT-L/14-336 (24 layers, D=1024, 16 heads, FFN 4096); ConvNeXt-L (depths 3/3/27/3, widths
  192/384/768/1536, LayerNorm eps 1e-6), ConvNeXt-XXL (3/4/30/3, 384/768/1536/3072, eps 1e-5); LLMs
  Vicuna-7B v1.5 (HR) and Vicuna-13B v1.5 (HR-X). Training: stage 1 (projector + `align_stages`, towers
  frozen, 384 px), stage 2 (everything incl. both towers and the adapters, 1024 px, ZeRO-3, max length
  2496). The DPN reference trains HR and HR-X with DPE layers 7/15/23 (its default for every model).

How it is built here: transformers' `CLIPVisionModel` (its embeddings, pre-layernorm and encoder layers
called one by one, as LLaVA-HR calls them) and transformers' `ConvNextModel` for the ConvNeXt (the same
network as timm's: stem conv + LayerNorm, downsample LayerNorm + 2x2 conv, blocks of depthwise 7x7 conv,
LayerNorm, Linear 4x, GELU, Linear, layer scale; only the weight names differ, see
`dpn.loading_hr`; its final pooled-output LayerNorm takes timm's `head.norm`). timm is not used. The
adapters and the fusion keep LLaVA-HR's module and parameter names (`slow_conv`, `fast_proj`, `gate.0`,
...). Everything acts per image, so a batch gives each sample what it would get alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, ConvNextModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from dpn.configuration_hr import CLIP_GROUPS, LlavaHRVisionConfig


def align_grid(src: torch.Tensor, dst_side: int) -> torch.Tensor:
    """(B, n, C) tokens of a square grid -> (B, dst_side^2, C): bilinear upsampling (align_corners=True,
    in fp32) to a finer grid, average pooling to a coarser one, as LLaVA-HR aligns its two branches."""
    b, n, c = src.shape
    side = math.isqrt(n)
    if side == dst_side:
        return src
    grid = src.transpose(1, 2).reshape(b, c, side, side)  # (B, C, s, s)
    if side < dst_side:
        grid = F.interpolate(grid.float(), size=(dst_side, dst_side), mode="bilinear", align_corners=True).to(src.dtype)
    else:
        grid = F.avg_pool2d(grid, side // dst_side, side // dst_side)
    return grid.reshape(b, c, -1).transpose(1, 2)


class MRAdapter(nn.Module):
    """Mixture-of-resolution adapter (LLaVA-HR's `S2FStitchAlignModuleV2`): adds the ConvNeXt map's detail
    to the CLIP tokens through a gate computed per image."""

    def __init__(self, fast_dim: int, slow_dim: int):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(fast_dim * 2, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1))
        # Read by `LlavaHRVisionModel._init_weights` (transformers initialises leaf modules one by one).
        self.slow_conv.hr_init = self.fast_conv.hr_init = "xavier"
        self.slow_proj.hr_init = self.fast_proj.hr_init = "proj"

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        """fast: (B, n, D) CLIP tokens of a square grid; slow: (B, C, h, w) ConvNeXt map -> (B, n, D)."""
        b, n, d = fast.shape
        side = math.isqrt(n)
        s = self.slow_proj(F.gelu(self.slow_conv(slow)))  # (B, D, h, w)
        s = align_grid(s.flatten(2).transpose(1, 2), side)  # (B, n, D)
        f = fast.transpose(1, 2).reshape(b, d, side, side)  # (B, D, side, side)
        f = f + self.fast_proj(F.gelu(self.fast_conv(f)))
        f = f.flatten(2).transpose(1, 2)  # (B, n, D)
        g = self.gate(torch.cat([f, s], dim=-1).mean(1)).unsqueeze(1)  # (B, 1, 1)
        return f + s * g.tanh()


class HRFusion(nn.Module):
    """The final fusion (LLaVA-HR's `MultiPathAlignModule`): fast_proj(CLIP tokens) + slow_proj(ConvNeXt
    tokens aligned to the CLIP grid)."""

    def __init__(self, fast_dim: int, slow_dim: int):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        s = align_grid(slow.flatten(2).transpose(1, 2), math.isqrt(fast.shape[1]))  # (B, n, C)
        return self.fast_proj(fast) + self.slow_proj(s)


def resample_position_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """(P, D) patch position embeddings of a square grid -> (side^2, D): bicubic with antialiasing in fp32,
    as timm's `resample_pos_embed` that LLaVA-HR uses (antialiased bicubic uses a = -0.5, not -0.75:
    the two modes differ even when upsampling)."""
    p, d = table.shape
    old = math.isqrt(p)
    if old == side:
        return table
    grid = table.float().reshape(1, old, old, d).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(side * side, d).to(table.dtype)


class LlavaHRVisionModel(PreTrainedModel):
    """LLaVA-HR's vision tower (see the module docstring): pixels (B, 3, S, S) -> fused tokens (B, g*g, D),
    g = `config.grid` (32 at S = 1024), D = the CLIP width."""

    config_class = LlavaHRVisionConfig
    config: LlavaHRVisionConfig
    base_model_prefix = "llava_hr_vision"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer", "ConvNextStage", "MRAdapter"]
    _supports_sdpa = True

    def __init__(self, config: LlavaHRVisionConfig):
        super().__init__(config)
        self.clip = CLIPVisionModel(config.clip_config)
        self.convnext = ConvNextModel(config.convnext_config)
        # timm builds every LayerNorm of the branch with one eps (1e-5 for ConvNeXt-XXL); transformers
        # hard-codes 1e-6 except in the final norm.
        for m in self.convnext.modules():
            if isinstance(m, ConvNextLayerNorm | nn.LayerNorm):
                m.eps = config.convnext_config.layer_norm_eps
        d, c = config.clip_config.hidden_size, config.convnext_config.hidden_sizes[-1]
        self.mr_adapters = (
            nn.ModuleList([MRAdapter(d, c) for _ in range(CLIP_GROUPS - 1)]) if config.mr_adapters else None
        )
        self.fusion = HRFusion(d, c)
        # Set by `gradient_checkpointing_enable` (the CLIP layers are checkpointed by transformers themselves).
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # LLaVA-HR's initialisation of its own modules (the CLIP and ConvNeXt sub-models init themselves):
        # adapter convs xavier with zero bias, output projections zero (a fresh adapter is the identity),
        # the gate and the fusion as torch's Linear default.
        kind = getattr(module, "hr_init", None)
        if kind is not None:  # an MR-adapter conv
            if kind == "proj" and self.config.adapter_zero_init:
                init.zeros_(module.weight)
            else:
                init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)

    # ----- the two branches ---------------------------------------------------------------------------
    def clip_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, g*g, D): the CLIP branch's input tokens (resize, patch conv, resampled position
        embeddings, pre-layernorm; no CLS)."""
        size = self.config.clip_image_size
        y = F.interpolate(pixel_values.float(), size=(size, size), mode="bilinear", align_corners=True)
        emb = self.clip.embeddings
        y = emb.patch_embedding(y.to(emb.patch_embedding.weight.dtype))  # (B, D, g, g)
        y = y.flatten(2).transpose(1, 2)  # (B, g*g, D)
        pos = resample_position_table(emb.position_embedding.weight[1:], self.config.grid)  # CLS row dropped
        return self.clip.pre_layrnorm(y + pos.to(y.dtype))

    def convnext_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, S/32, S/32): stem and every stage of the ConvNeXt (no final norm, no head)."""
        x = self.convnext.embeddings(pixel_values.to(self.convnext.embeddings.patch_embeddings.weight.dtype))
        for stage in self.convnext.encoder.stages:
            for layer in stage.downsampling_layer:
                x = layer(x)
            for block in stage.layers:
                if self.gradient_checkpointing and self.training:
                    # As LLaVA-HR (timm's grad_checkpointing per block): at 1024 px the maps dominate memory.
                    x = self._gradient_checkpointing_func(block.__call__, x)
                else:
                    x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        slow = self.convnext_map(pixel_values)  # (B, C, h, w)
        fast = self.clip_tokens(pixel_values)  # (B, g*g, D)
        layers = self.clip.encoder.layers
        per_group = len(layers) // CLIP_GROUPS
        for k in range(CLIP_GROUPS):
            for layer in layers[k * per_group : (k + 1) * per_group]:
                fast = layer(fast, attention_mask=None)
            if k < CLIP_GROUPS - 1 and self.mr_adapters is not None:
                fast = self.mr_adapters[k](fast, slow)
        return self.fusion(fast, slow)  # (B, g*g, D)


__all__ = ["HRFusion", "LlavaHRVisionModel", "MRAdapter", "align_grid", "resample_position_table"]
