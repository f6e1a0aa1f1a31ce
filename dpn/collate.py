"""Batching of tokenized samples (and their images) into model inputs, and reading back which side a
batch is padded on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from dpn.constants import IGNORE_INDEX


def _as_list(x, what: str, i: int) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"sample {i}: {what} must be 1-D; got shape {tuple(x.shape)}")
        return x.tolist()
    return list(x)


def collate(samples: Sequence[Mapping], pad_token_id: int, padding_side: Literal["right", "left"] = "right",
            image_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of samples into a batch.

    Args:
        samples: mappings with "input_ids" and "labels" (equal-length int sequences or 1-D tensors) and
            optionally "pixel_values": a (3, H, W) tensor, or None / absent for a text-only sample.
        pad_token_id: id written into padded input positions (never attended: attention_mask is 0 there).
        padding_side: "right" for training, "left" for batched generation (prompts end together).
        image_token_id: when given, check that exactly the samples with pixel_values hold image tokens.
    Returns:
        input_ids (B, L) long, attention_mask (B, L) long (1 = real token), labels (B, L) long padded with
        IGNORE_INDEX, and pixel_values (N_img, 3, H, W) only when some sample has an image. pixel_values
        follows the order of the samples that have an image: the model gives the k-th image to the k-th
        sample (in batch order) that holds image tokens.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids_list, labels_list, images = [], [], []
    for i, s in enumerate(samples):
        ids = _as_list(s["input_ids"], "input_ids", i)
        labels = _as_list(s["labels"], "labels", i)
        if not ids:
            raise ValueError(f"sample {i} has no input_ids")
        if len(ids) != len(labels):
            raise ValueError(f"sample {i}: input_ids has {len(ids)} tokens but labels has {len(labels)}")
        pix = s.get("pixel_values")
        if pix is not None:
            if not isinstance(pix, torch.Tensor) or pix.dim() != 3 or pix.shape[0] != 3:
                raise ValueError(f"sample {i}: pixel_values must be a (3, H, W) tensor; got "
                                 f"{tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__}")
            if images and pix.shape != images[0].shape:
                raise ValueError(f"sample {i}: pixel_values shape {tuple(pix.shape)} differs from "
                                 f"{tuple(images[0].shape)} of an earlier sample")
            images.append(pix)
        if image_token_id is not None and (image_token_id in ids) != (pix is not None):
            raise ValueError(f"sample {i}: {'has' if pix is not None else 'lacks'} pixel_values but "
                             f"{'holds' if image_token_id in ids else 'holds no'} image tokens (id {image_token_id})")
        ids_list.append(ids)
        labels_list.append(labels)

    batch, length = len(samples), max(len(x) for x in ids_list)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    # From the lengths, not input_ids != pad: the pad id may also occur as a real token.
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(ids_list, labels_list, strict=True)):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        labels[b, sl] = torch.tensor(lab, dtype=torch.long)
        attention_mask[b, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if images:
        out["pixel_values"] = torch.stack(images)  # (N_img, 3, H, W)
    return out


def padding_side_of(attention_mask: torch.Tensor) -> str:
    """"none", "left" or "right": where a batch's padding sits. Each row's real tokens must be contiguous
    and every padded row padded on the same side; anything else is refused, naming the row.

    Why it matters: after pooling, samples of one batch have different lengths and are padded again. An
    unpadded batch is re-padded on the left, so that the last position of every row stays its last real
    token (what generation reads) whatever path each sample took; a right-padded one on the right.
    """
    mask = attention_mask.bool()
    n = mask.sum(-1)  # (B,)
    first = mask.long().argmax(-1)  # (B,) first real position (0 for an empty row)
    L = mask.shape[1]
    sides = set()
    for b in range(mask.shape[0]):
        nb, fb = int(n[b]), int(first[b])
        if nb == 0:
            raise ValueError(f"row {b} of attention_mask has no real token")
        if not bool(mask[b, fb : fb + nb].all()):
            raise ValueError(f"row {b} of attention_mask has padding between real tokens; pad on one side only")
        if nb == L:
            continue
        if fb + nb == L:
            sides.add("left")
        elif fb == 0:
            sides.add("right")
        else:
            raise ValueError(f"row {b} of attention_mask is padded on both sides; pad on one side only")
    if len(sides) > 1:
        raise ValueError("attention_mask mixes left- and right-padded rows; pad every row on the same side")
    return sides.pop() if sides else "none"
