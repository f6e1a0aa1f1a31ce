"""Validation and processing of one LLaVA record: the per-record work of `dpn preprocess`.

Pure Python (no Ray): `pipelines.data.preprocess` runs `RecordProcessor.process_records` inside Ray Data tasks,
and the benchmark's single-process loop runs the very same code. A record either becomes one shard row
or one quarantine row `(index, id, reason, detail)`; nothing is dropped silently and no record can
crash the job (an unexpected exception becomes reason `internal_error`).

Checks run cheapest first, so a record's reason is the first failure in this order:
    bad_text, not_object, bad_schema, empty_conversation, bad_roles, empty_turn, template_mismatch,
    image_placement, special_token_in_text, image_outside_root, (tokenization:) invalid_conversation,
    tokenization_mismatch, too_long, (image file, `dpn.image_io`:) image_missing, image_not_regular,
    image_outside_root (a symlink leaving the root), image_too_large / image_too_small, image_corrupt.

Records are addressed by `index` (position in the annotations array): ids are not unique in the real
mix665K (one COCO id recurs across sub-datasets), so no table here is keyed by `id`.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from dpn.constants import IMAGE_TOKEN
from dpn.image_io import MAX_IMAGE_BYTES

HUMAN, GPT = "human", "gpt"

# reason -> what it means. The summary and the quarantine table use exactly these keys.
QUARANTINE_REASONS: dict[str, str] = {
    "bad_text": "the record's bytes are not valid UTF-8, or its text holds a lone surrogate (an unpaired "
                "\\ud800-\\udfff escape): no tokenizer or Parquet file can take it",
    "not_object": "the array element is not a JSON object",
    "bad_schema": "id / image / conversations missing or mistyped, or a turn that is not {from: str, value: str}",
    "empty_conversation": "conversations is an empty list",
    "bad_roles": "a role other than human/gpt, roles not alternating from human (one leading gpt turn is "
                 "dropped, as LLaVA does), or a conversation that ends with a human turn",
    "empty_turn": "a turn whose text is empty or whitespace",
    "template_mismatch": "the plain template takes image records with exactly one human and one gpt turn",
    "image_placement": "an image record needs exactly one <image> in its human turns and none in gpt turns; "
                       "a text-only record none at all",
    "special_token_in_text": "the text holds a special token string other than <image> (e.g. </s>, <ROUTER>)",
    "invalid_conversation": "rejected by dpn.conversation.tokenize_conversation for another reason",
    "tokenization_mismatch": "a token straddles a supervised/unsupervised boundary (LLaVA would train it "
                             "with every label masked)",
    "too_long": "more tokens (image tokens included) than max_length",
    "image_outside_root": "the image path is absolute or climbs out of the image root with '..', or is a "
                          "symlink resolving outside it (allowed only with follow_symlinks_outside_root)",
    "image_missing": "no file at the image path (or it cannot be read)",
    "image_not_regular": "the image path is a FIFO, socket, device or directory, not a regular file",
    "image_too_small": "an image side is below min_image_side",
    "image_too_large": "more pixels than max_image_pixels (checked before decoding), a side above "
                       "max_image_side, or a file above max_image_bytes",
    "image_corrupt": "the file does not decode completely (unknown format, corrupt or truncated data) or "
                     "cannot be converted to RGB",
    "internal_error": "an unexpected exception while processing the record (a bug: the detail has the traceback)",
}

ImageStorage = Literal["bytes", "pixels"]
IMAGE_STORAGES: tuple[str, ...] = ("bytes", "pixels")

# One shard row per valid record. Token lists are int32 (vocabularies are far below 2^31) to halve the
# shard size; `length` = len(input_ids), image tokens included (what the model's sequence length is).
SHARD_SCHEMA = pa.schema([
    pa.field("index", pa.int64(), nullable=False),  # position in the annotations array: the row's key
    pa.field("id", pa.string()),
    pa.field("modality", pa.string(), nullable=False),  # "image" | "text"
    pa.field("length", pa.int32(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    pa.field("image", pa.string()),  # the record's relative path, as written in the annotations
    pa.field("image_width", pa.int32()),  # geometry of the original image (before padding/resizing)
    pa.field("image_height", pa.int32()),
    pa.field("image_mode", pa.string()),  # PIL mode of the original (RGB, L, P, CMYK, ...)
    pa.field("image_format", pa.string()),  # PIL format of the original (JPEG, PNG, ...)
    pa.field("image_bytes", pa.binary()),  # image_storage="bytes": the original file, byte for byte
    pa.field("pixel_values", pa.binary()),  # image_storage="pixels": float32 (3, S, S), C order
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("index", pa.int64(), nullable=False),
    pa.field("id", pa.string()),  # null when the record has no usable id (e.g. not an object)
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
])

# What a processing task hands to the writer: shard columns (nullable) + the quarantine reason/detail
# (null for valid rows), so one Ray Data block carries both outcomes through one fused map->write task.
BLOCK_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in SHARD_SCHEMA]
    + [pa.field("reason", pa.string()), pa.field("detail", pa.string())]
)

_DETAIL_CHARS = 400


class RecordError(Exception):
    """A record fails a check: it goes to the quarantine table with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str):
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; valid: {sorted(QUARANTINE_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _writable(text: str | None) -> str | None:
    """`text` with lone surrogates escaped: a quarantine row must be valid UTF-8 to be written."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class UnreadableRecord:
    """Stands for an annotation record whose bytes could not be read as text (invalid UTF-8, or not JSON on
    its own): `pipelines.data.annotations.read_records` yields it in the record's place, and it is
    quarantined as `bad_text` with `detail`, the other records of the file unaffected."""

    def __init__(self, detail: str):
        self.detail = detail


_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(value: Any, where: str = "record") -> str | None:
    """Where (e.g. "record.conversations[1].value") the first string of a parsed JSON value holds a lone
    surrogate (JSON lets "\\ud800" through; UTF-8 cannot encode it), or None."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return f"{where} holds a lone surrogate U+{ord(m.group()):04X}" if m else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and (found := find_lone_surrogate(key, f"{where} key")):
            return found
        found = find_lone_surrogate(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found:
            return found
    return None


def check_conversation(record: Mapping[str, Any], template: str, special_tokens: Sequence[str]) -> bool:
    """Check a record's schema and turns; return whether it has an image. Raises RecordError.

    Mirrors what `dpn.conversation.tokenize_conversation` requires, checked here first so that every
    failure gets its own quarantine reason instead of one generic message.
    """
    rid = record.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise RecordError("bad_schema", f"id must be a string or an integer; got {_short(rid)}")
    has_image = "image" in record
    if has_image and (not isinstance(record["image"], str) or not record["image"]):
        raise RecordError("bad_schema", f"image must be a non-empty string path; got {_short(record['image'])}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise RecordError("bad_schema", f"conversations must be a list of turns; got {_short(conversations)}")
    if not conversations:
        raise RecordError("empty_conversation", "conversations is []")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise RecordError("bad_schema", f"turn {i} must be {{'from': str, 'value': str}}; got {_short(turn)}")
        if turn["from"] not in (HUMAN, GPT):
            raise RecordError("bad_roles", f"turn {i} has role {turn['from']!r}; valid roles: 'human', 'gpt'")
    # LLaVA's preprocess drops one leading assistant turn (some ShareGPT conversations open with the model).
    turns = conversations[1:] if conversations[0]["from"] == GPT else conversations
    if not turns:
        raise RecordError("bad_roles", "the only turn is a gpt turn")
    for j, turn in enumerate(turns):
        expected = HUMAN if j % 2 == 0 else GPT
        if turn["from"] != expected:
            raise RecordError("bad_roles", f"turn {j} (after dropping a leading gpt turn) is {turn['from']!r}, "
                                           f"expected {expected!r}: roles must alternate human/gpt")
    if len(turns) % 2:
        raise RecordError("bad_roles", f"the conversation ends with a human turn (turn {len(turns) - 1})")
    for j, turn in enumerate(turns):
        if not turn["value"].strip():
            raise RecordError("empty_turn", f"turn {j} ({turn['from']}) has no text")
    if template == "plain" and (not has_image or len(turns) != 2):
        raise RecordError("template_mismatch", f"plain needs an image and 2 turns; got has_image={has_image}, "
                                               f"{len(turns)} turns")
    in_human = sum(t["value"].count(IMAGE_TOKEN) for t in turns[0::2])
    in_gpt = sum(t["value"].count(IMAGE_TOKEN) for t in turns[1::2])
    if has_image and (in_human != 1 or in_gpt):
        raise RecordError("image_placement", f"image record with {in_human} {IMAGE_TOKEN} in human turns and "
                                             f"{in_gpt} in gpt turns; needs exactly 1 and 0")
    if not has_image and in_human + in_gpt:
        raise RecordError("image_placement", f"text-only record holds {in_human + in_gpt} {IMAGE_TOKEN}")
    for j, turn in enumerate(turns):
        found = [s for s in special_tokens if s != IMAGE_TOKEN and s in turn["value"]]
        if found:
            raise RecordError("special_token_in_text", f"turn {j} contains {found}")
    return has_image


def resolve_image_path(image_root: Path, rel: str) -> Path:
    """`image_root / rel`, refusing paths that are absolute or climb out of the root. Raises RecordError.

    The check is lexical (the annotation text is what is untrusted); where a symlink inside the root
    leads is checked when the file is read (`load_image`): outside the root only with
    `follow_symlinks_outside_root` (an operator's `coco -> /data/coco`).
    """
    if "\x00" in rel:
        raise RecordError("bad_schema", f"image path contains a NUL byte: {_short(rel)}")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if posixpath.isabs(norm) or os.path.isabs(rel) or norm == ".." or norm.startswith("../") or norm == ".":
        raise RecordError("image_outside_root", f"image path {_short(rel)} is not inside the image root")
    return image_root / norm


@dataclass(kw_only=True)
class DecodedImage:
    """An image that decoded completely and converted to RGB."""

    data: bytes  # the file's bytes
    rgb: Any  # PIL.Image.Image in mode RGB
    width: int
    height: int
    mode: str  # of the file, before RGB conversion
    format: str | None


# `dpn.image_io` reasons -> quarantine reasons.
_IMAGE_REASONS = {"missing": "image_missing", "not_regular": "image_not_regular",
                  "outside_root": "image_outside_root", "too_large": "image_too_large", "corrupt": "image_corrupt"}


def load_image(path: Path, *, min_image_side: int, max_image_side: int, max_image_pixels: int,
               max_image_bytes: int, image_root: Path | None = None, follow_symlinks_outside_root: bool = False
               ) -> DecodedImage:
    """Read (bounded, regular files only, inside `image_root` unless `follow_symlinks_outside_root`: see
    `dpn.image_io`), size-check, fully decode and RGB-convert one image file. Raises RecordError."""
    from dpn.image_io import ImageFileError, decode_image, read_image_file
    from dpn.image_processing import to_rgb

    try:
        data = read_image_file(path, max_bytes=max_image_bytes, root=image_root,
                               follow_outside_root=follow_symlinks_outside_root)
        img = decode_image(data, max_pixels=max_image_pixels)
    except ImageFileError as e:
        raise RecordError(_IMAGE_REASONS[e.reason], _short(e.detail)) from None
    with img:
        width, height = img.size
        if min(width, height) < min_image_side:
            raise RecordError("image_too_small", f"{width}x{height} < min_image_side={min_image_side}")
        if max(width, height) > max_image_side or width * height > max_image_pixels:
            raise RecordError("image_too_large", f"{width}x{height} exceeds max_image_side={max_image_side} "
                                                 f"or max_image_pixels={max_image_pixels}")
        try:
            img.load()  # a truncated file fails here, not at open (which reads the header only)
            rgb = to_rgb(img)
            rgb.load()
        except Exception as e:
            raise RecordError("image_corrupt", _short(f"{type(e).__name__}: {e}")) from None
        return DecodedImage(data=data, rgb=rgb, width=width, height=height, mode=img.mode, format=img.format)


class RecordProcessor:
    """Turns LLaVA records into shard rows or quarantine rows.

    Args:
        tokenizer: a fast tokenizer holding `<image>` (and `<ROUTER>` when `add_router_token`).
        template: "plain" or "vicuna_v1".
        num_image_tokens: copies of the image token id that replace `<image>` in input_ids.
        add_router_token: append `<ROUTER>` to every human turn of image records (DPN).
        image_root: directory the records' relative image paths are resolved against.
        image_storage: "bytes" keeps the original file bytes (decoded and processed by the loader);
            "pixels" stores the processed float32 (3, S, S) tensor.
        image_processor: the CLIP processor used for "pixels" (ignored for "bytes").
        min_image_side, max_image_side, max_image_pixels: image size limits.
        max_image_bytes: image files above this size are quarantined unread.
        follow_symlinks_outside_root: read images through symlinks that leave `image_root` (otherwise
            quarantined as image_outside_root).
        max_length: longest allowed input_ids (image tokens included); None for no limit.
    """

    def __init__(self, *, tokenizer, template: str, num_image_tokens: int, add_router_token: bool,
                 image_root: str | os.PathLike[str], image_storage: ImageStorage, image_processor=None,
                 min_image_side: int, max_image_side: int, max_image_pixels: int, max_length: int | None,
                 max_image_bytes: int = MAX_IMAGE_BYTES, follow_symlinks_outside_root: bool = False):
        if image_storage not in IMAGE_STORAGES:
            raise ValueError(f"image_storage must be one of {IMAGE_STORAGES}; got {image_storage!r}")
        if image_storage == "pixels" and image_processor is None:
            raise ValueError("image_storage='pixels' needs an image_processor")
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.add_router_token = add_router_token
        self.image_root = Path(image_root)
        self.image_storage = image_storage
        self.image_processor = image_processor
        self.min_image_side = min_image_side
        self.max_image_side = max_image_side
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.follow_symlinks_outside_root = follow_symlinks_outside_root
        self.max_length = max_length
        self._special_tokens = tuple(tokenizer.all_special_tokens)

    def process(self, index: int, record: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Return (shard row, None) for a valid record, (None, quarantine row) otherwise."""
        rid = None
        try:
            if isinstance(record, UnreadableRecord):
                raise RecordError("bad_text", record.detail)
            surrogate = find_lone_surrogate(record)
            if surrogate:
                raise RecordError("bad_text", surrogate)
            if not isinstance(record, dict):
                raise RecordError("not_object", f"element is a {type(record).__name__}: {_short(json.dumps(record))}")
            raw_id = record.get("id")
            rid = None if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) else str(raw_id)
            return self._process(index, rid, record), None
        except RecordError as e:
            return None, {"index": index, "id": _writable(rid), "reason": e.reason, "detail": _writable(_short(e.detail))}
        except Exception as e:  # never let one record take the job down
            detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-3)}"
            return None, {"index": index, "id": _writable(rid), "reason": "internal_error",
                          "detail": _writable(_short(detail))}

    def _process(self, index: int, rid: str | None, record: dict[str, Any]) -> dict[str, Any]:
        from dpn.conversation import tokenize_conversation

        has_image = check_conversation(record, self.template, self._special_tokens)
        # Lexical path check before the (costlier) tokenization; the file is read last.
        path = resolve_image_path(self.image_root, record["image"]) if has_image else None
        try:
            sample = tokenize_conversation(
                record["conversations"], self.tokenizer, self.template, num_image_tokens=self.num_image_tokens,
                has_image=has_image, add_router_token=self.add_router_token,
            )
        except ValueError as e:
            raise RecordError("invalid_conversation", _short(str(e))) from None
        if sample.mismatch:
            raise RecordError("tokenization_mismatch", f"prompt: {_short(sample.prompt)}")
        length = len(sample.input_ids)
        if self.max_length is not None and length > self.max_length:
            raise RecordError("too_long", f"{length} tokens > max_length={self.max_length}")
        row: dict[str, Any] = {
            "index": index, "id": rid, "modality": "image" if has_image else "text", "length": length,
            "input_ids": sample.input_ids, "labels": sample.labels,
            "image": None, "image_width": None, "image_height": None, "image_mode": None, "image_format": None,
            "image_bytes": None, "pixel_values": None,
        }
        if path is not None:
            image = load_image(path, min_image_side=self.min_image_side, max_image_side=self.max_image_side,
                               max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes,
                               image_root=self.image_root,
                               follow_symlinks_outside_root=self.follow_symlinks_outside_root)
            row.update(image=record["image"], image_width=image.width, image_height=image.height,
                       image_mode=image.mode, image_format=image.format)
            if self.image_storage == "bytes":
                row["image_bytes"] = image.data
            else:
                from dpn.image_processing import preprocess_images

                pixels = preprocess_images([image.rgb], self.image_processor)[0]  # (3, S, S) float32
                row["pixel_values"] = pixels.contiguous().numpy().tobytes()
        return row

    def process_records(self, indices: Iterable[int], records: Iterable[Any]) -> pa.Table:
        """Process parsed records (any JSON values); return one table in `BLOCK_SCHEMA` (shard rows have a
        null `reason`, quarantine rows a reason and null payload). `split_block` separates them."""
        out = []
        for index, record in zip(indices, records, strict=True):
            row, q = self.process(int(index), record)
            out.append(row if row is not None else q)
        return pa.Table.from_pylist(out, schema=BLOCK_SCHEMA)


def split_block(block: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(shard rows in SHARD_SCHEMA, quarantine rows in QUARANTINE_SCHEMA) of a `process_records` table."""
    import pyarrow.compute as pc

    bad = pc.is_valid(block["reason"])
    rows = block.filter(pc.invert(bad)).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    quarantine = block.filter(bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    return rows, quarantine
