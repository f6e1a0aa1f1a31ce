"""Image preprocessing as LLaVA-1.5 does it ("pad" aspect ratio): convert to RGB, pad to a square with the
mean colour, then CLIP's processor (resize shortest edge, center crop, rescale to [0, 1], normalise).

OpenAI CLIP normalisation (what LLaVA-1.5's CLIP ViT-L/14-336 was trained with):
    OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
    OPENAI_CLIP_STD  = (0.26862954, 0.26130258, 0.27577711)
The square padding colour is tuple(int(m * 255) for m in image_mean) = (122, 116, 104), which normalises
to ~0 in every channel, i.e. padding carries no signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch
    from transformers import CLIPImageProcessorPil

# torch and transformers are imported inside the functions that use them: `to_rgb` (all that
# `dpn preprocess` needs with image_storage="bytes") then costs a process no torch/transformers import,
# ~1.3 CPU-seconds per cold Ray worker on top of the tokenizer's.

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

WHITE = (255, 255, 255)

# Modes PIL can only hold with an alpha band (or an equivalent: a transparent palette entry / colour).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit "L". PIL's own convert clips at 255, which turns
    most 16-bit images white; scale instead."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0  # 65535 -> 255
    elif img.mode == "I":
        # 32-bit ints: 16-bit PNGs often open as "I" with values up to 65535; 8-bit data stays as is.
        a = np.clip(a, 0, 65535)
        if a.max(initial=0) > 255:
            a = a / 257.0
    else:  # "F": [0, 1] floats are scaled, anything else is taken as 0..255
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparency (alpha band, palette transparency, tRNS colour) is composited onto `background`, white
    by default: that is how viewers show such images, keeps dark-on-transparent content (logos, text,
    diagrams) legible, and avoids LLaVA's plain `.convert("RGB")`, which drops alpha and exposes whatever
    colour sits under transparent pixels (often black). 16-bit and float grayscale are rescaled to 8 bit.
    CMYK/YCbCr/LAB/HSV/1/L/P go through PIL's converters.
    """
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)  # drops a tRNS colour, which such images essentially never carry
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        if img.mode == "La":  # premultiplied: PIL has no direct La -> RGBA converter
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def expand2square(img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad to a square, image centered (LLaVA's geometry: offset (long - short) // 2 on the short side)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def build_image_processor(image_size: int, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                          image_std: Sequence[float] = OPENAI_CLIP_STD) -> CLIPImageProcessorPil:
    """CLIP image processor built offline: resize the shortest edge to `image_size` (bicubic), center crop
    `image_size` x `image_size`, rescale by 1/255, normalise by mean/std.

    It is the PIL-backed CLIPImageProcessor (the "slow" one LLaVA used), chosen explicitly so results
    do not depend on whether torchvision is installed; it saves as "CLIPImageProcessor" and reloads with
    AutoImageProcessor.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(f"image_mean/image_std need 3 channels and std > 0; got {image_mean}, {image_std}")
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=False,  # to_rgb already did it, with our transparency handling
    )


def pad_color(processor) -> tuple[int, int, int]:
    """LLaVA's square-padding colour: the processor's mean in 0..255, truncated."""
    return tuple(int(m * 255) for m in processor.image_mean)


def preprocess_images(images: Sequence[Image.Image], processor) -> torch.Tensor:
    """to_rgb + pad to square with the mean colour + CLIP processing. Returns (N, 3, H, W) float32."""
    import torch

    crop = processor.crop_size
    height, width = crop["height"], crop["width"]
    if not images:
        return torch.empty(0, 3, height, width)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL.Image; got {type(im).__name__}")
    fill = pad_color(processor)
    squares = [expand2square(to_rgb(im), fill) for im in images]
    pixel_values = processor(images=squares, return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    return pixel_values.to(torch.float32)
