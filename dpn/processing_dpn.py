"""`DPNProcessor`: the tokenizer, the image processor and LLaVA-1.5's prompt template of a DPN model in one
object, as transformers' `LlavaProcessor` is for LLaVA.

    processor = DPNProcessor.from_pretrained(model_dir)          # tokenizer files + processor_config.json
    inputs = processor(images=[image, None], text=["What color is the circle?", "What is 2 plus 3?"])
    out = model.generate(**inputs, max_new_tokens=16)

`text` holds the questions; the processor writes each into the template (`dpn.conversation.build_prompt`:
vicuna_v1's system prompt and roles, `<image>` first, `<ROUTER>` at the end of the turn for the dpn
compressor), tokenizes it with `<image>` expanded to one image token per visual feature, and left-pads
the batch (prompts end together, as generation needs). `images` holds one image per question, None for a
text-only one; `pixel_values` stacks the given images in sample order, which is the order the model
assigns them in. These are exactly the inputs `dpn.inference.predict` feeds the model (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from dpn.collate import collate
from dpn.constants import IMAGE_TOKEN
from dpn.conversation import build_prompt, encode_prompt, get_template, tokenize_prompt
from dpn.image_processing import build_image_processor, preprocess_images


class DPNProcessor(ProcessorMixin):
    """Builds `DPNForConditionalGeneration` inputs from questions and images (see the module docstring).

    Args:
        image_processor: the CLIP image processor (`dpn.image_processing.build_image_processor`).
        tokenizer: the model's tokenizer, holding `<image>` (and `<ROUTER>` for dpn).
        template: conversation template of the prompts ("vicuna_v1"; "plain" for stage-1 captioning).
        num_image_tokens: image tokens per image in `input_ids` (the model's `config.num_image_tokens`).
        add_router_token: append `<ROUTER>` to the question (the dpn compressor reads it).
    """

    def __init__(self, image_processor=None, tokenizer=None, template: str = "vicuna_v1",
                 num_image_tokens: int | None = None, add_router_token: bool = False, **kwargs: Any):
        get_template(template)  # raises naming the valid templates
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be an int >= 1 (the model's config.num_image_tokens), "
                             f"got {num_image_tokens!r}")
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.add_router_token = bool(add_router_token)
        super().__init__(image_processor, tokenizer, **kwargs)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; left padding needs one (dpn.tokenizer.ensure_special_tokens)")

    @classmethod
    def from_model_config(cls, config, tokenizer, template: str = "vicuna_v1") -> DPNProcessor:
        """The processor of a model with `config` (a `DPNConfig`): its image size and visual tokens, and
        `<ROUTER>` when its compressor is dpn."""
        return cls(build_image_processor(config.vision_config.image_size), tokenizer, template=template,
                   num_image_tokens=config.num_image_tokens, add_router_token=config.compressor == "dpn")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> DPNProcessor:
        """Load a processor saved with `save_pretrained` from a local directory (never the hub). The image
        processor is rebuilt as the PIL-backed CLIP processor of `build_image_processor`, whatever
        transformers would pick, so that pixels do not depend on whether torchvision is installed."""
        kwargs.setdefault("local_files_only", True)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        ip = processor.image_processor
        processor.image_processor = build_image_processor(ip.crop_size["height"], ip.image_mean, ip.image_std)
        return processor

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode(self, text: str, image: Image.Image | None = None, add_router_token: bool | None = None,
               continuation: str = "") -> dict[str, Any]:
        """One sample: {"input_ids": list of ids, "labels": the same, "pixel_values": (3, H, W) or None}.
        `continuation` is text after the prompt's "ASSISTANT:" (e.g. " A"), tokenized together with it, for
        scoring an answer (`dpn.inference.continuation_logprobs`).

        Raises ValueError for a question the template cannot take (e.g. holding `<ROUTER>`) or an image
        that is not a PIL image."""
        router = self.add_router_token if add_router_token is None else add_router_token
        if continuation:
            prompt = build_prompt(text, self.template, image is not None, router)
            ids = tokenize_prompt(prompt + continuation, self.tokenizer, self.num_image_tokens)
        else:
            ids = encode_prompt(text, self.tokenizer, self.template, self.num_image_tokens, image is not None, router)
        pixels = preprocess_images([image], self.image_processor)[0] if image is not None else None
        return {"input_ids": ids, "labels": ids, "pixel_values": pixels}

    def pad(self, samples: Sequence[dict[str, Any]], keep_labels: bool = False) -> BatchFeature:
        """Left-pad `encode`d samples into model inputs: input_ids and attention_mask (B, L), and
        pixel_values (N_img, 3, H, W) when some sample has an image; labels (B, L) too with `keep_labels`."""
        batch = collate(samples, pad_token_id=self.tokenizer.pad_token_id, padding_side="left",
                        image_token_id=self.image_token_id)
        if not keep_labels:
            batch.pop("labels")
        return BatchFeature(batch)

    def __call__(self, images: Image.Image | Sequence[Image.Image | None] | None = None,
                 text: str | Sequence[str] | None = None, add_router_token: bool | None = None,
                 **kwargs: Any) -> BatchFeature:
        """Model inputs for `text` (one question or a list) with `images` (one per question, None for a
        text-only question; None: no images at all). `add_router_token` overrides the processor's."""
        if kwargs:
            raise TypeError(f"DPNProcessor takes images, text and add_router_token; got {sorted(kwargs)}")
        if text is None:
            raise ValueError("text is required: the question(s) to ask")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [None] * len(texts)
        elif isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if len(images) != len(texts):
            raise ValueError(f"give one image (or None) per question: {len(images)} images for {len(texts)} questions")
        return self.pad([self.encode(t, im, add_router_token) for t, im in zip(texts, images, strict=True)])


__all__ = ["DPNProcessor"]
