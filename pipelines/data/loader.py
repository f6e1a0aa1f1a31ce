"""Training-side reading of the shards written by `dpn preprocess` (`pipelines.data.preprocess`).

API (all keyword arguments are validated eagerly; errors name the bad value):

    info = open_shards(path)
        `path` is a published run directory OUT/<fingerprint> or the output root OUT (then OUT/LATEST
        names the run). Returns a `ShardInfo`: the shard files (sorted) and everything the batches need
        (image_storage, image_size, num_image_tokens, pad/image token ids, template, counts).

    ds = read_shards(info_or_path, *, columns=None, rank=0, world_size=1)
        A `ray.data.Dataset` over the shards (rows in `records.SHARD_SCHEMA`), in a fixed file order
        (`preserve_order`), so the row stream is the same on every run. `rank`/`world_size` keep the
        files `files[rank::world_size]` (a deterministic per-worker split; see below).

    quarantine = read_quarantine(info_or_path)        -> pyarrow.Table (index, id, reason, detail)

    for batch in iter_micro_batches(rows, info, *, micro_batch_size, seed, epoch, window_rows=4096,
                                    megabatch_factor=8, group_by_length=True, drop_last=False,
                                    image_processor=None, return_index=False):
        model(**batch)
        `rows`: a ray.data.Dataset, a ray.data.DataIterator (e.g. `ray.train.get_dataset_shard("train")`
        in a Ray Train worker), a pyarrow.Table, or an iterable of pyarrow Tables/RecordBatches, with at
        least the columns index, modality, length, input_ids, labels and the image column of
        `info.image_storage` ("image_bytes" or "pixel_values").
        Yields dicts of tensors built by `dpn.collate.collate` (right padding):
            input_ids (B, L) long, attention_mask (B, L) long, labels (B, L) long (IGNORE_INDEX = -100
            on padding and unsupervised tokens), and pixel_values (B, 3, S, S) float32 only in image
            batches; with return_index=True also "index" (B,) long, the rows' record indices.
        Every micro-batch is single-modality (all rows with an image, or all text-only), as DPN's
        reference trains: a text-only sample would otherwise disable pooling for the whole batch.

How batches are formed. Rows are consumed in windows of `window_rows`. In each window the rows are
ordered by a hash of (seed, epoch, record index) - not by arrival order - then split by modality; each
modality's rows are cut into megabatches of `megabatch_factor * micro_batch_size`, each megabatch is
sorted by length (longest first) and cut into micro-batches (LLaVA's modality- and length-grouped
sampler, applied per window), and the window's micro-batches are emitted in an order shuffled by
(seed, epoch, window number). A modality's last partial micro-batch of a window is carried into the
next window; at the end of the stream partial batches are emitted unless `drop_last`.

Determinism: the batches are a function of (seed, epoch) and of which rows fall in which window. A
window's content is fixed when the row stream is: `read_shards` keeps file order, so a Dataset (or a
Table) gives the same batches on every run; a window of at least the dataset's size makes the batches
independent of the row order altogether. Under Ray Train, `get_dataset_shard` splits the stream among
workers dynamically (which rows a worker gets can vary between runs); for bit-identical batches per
worker, build the dataset in the worker with `read_shards(info, rank=r, world_size=n)` instead.
Workers may get different numbers of micro-batches (modality split, partial batches): a data-parallel
trainer must agree on the step count (e.g. all-reduce the minimum) or use `drop_last`.

Images: with image_storage "bytes" the original file is decoded here and processed by
`dpn.image_processing.preprocess_images` (to RGB, pad to square with the mean colour, resize,
normalise) - the same code that evaluation runs; with "pixels" the stored tensor is used as is.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

MANIFEST = "manifest.json"
LATEST = "LATEST"
_NEEDED = ("index", "modality", "length", "input_ids", "labels")
_IMAGE_COLUMN = {"bytes": "image_bytes", "pixels": "pixel_values"}
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """A published preprocessing run, as read from its manifest."""

    path: str
    fingerprint: str
    files: tuple[str, ...]
    """Absolute paths of the shard files, sorted by first record index."""
    quarantine_files: tuple[str, ...]
    image_storage: str
    image_size: int
    num_image_tokens: int
    pad_token_id: int
    image_token_id: int
    template: str
    add_router_token: bool
    rows: int
    images: int
    quarantined: dict[str, int]
    manifest: dict[str, Any]

    @property
    def image_column(self) -> str:
        return _IMAGE_COLUMN[self.image_storage]


def open_shards(path: str | os.PathLike[str]) -> ShardInfo:
    """Read the manifest of OUT/<fingerprint> (or of the run OUT/LATEST names when given OUT)."""
    root = Path(path)
    if not (root / MANIFEST).is_file() and (root / LATEST).is_file():
        root = root / (root / LATEST).read_text().strip()
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{str(path)!r} is not a preprocessed run directory (no {MANIFEST}) nor an output root "
                         f"with {LATEST}")
    m = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    files = tuple(str(root / "shards" / s["file"]) for s in m["shards"])
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"shard {f!r} listed in {root / MANIFEST} is missing")
    qdir = root / "quarantine"
    cfg = m["config"]
    return ShardInfo(
        path=str(root), fingerprint=m["fingerprint"], files=tuple(sorted(files)),
        quarantine_files=tuple(sorted(str(p) for p in qdir.glob("*.parquet"))) if qdir.is_dir() else (),
        image_storage=cfg["image_storage"], image_size=cfg["image_size"], num_image_tokens=cfg["num_image_tokens"],
        pad_token_id=m["tokens"]["pad_token_id"], image_token_id=m["tokens"]["image_token_id"],
        template=cfg["template"], add_router_token=cfg["add_router_token"], rows=m["counts"]["rows_out"],
        images=m["counts"]["images_out"], quarantined=m["counts"]["quarantined"], manifest=m,
    )


def _info(info_or_path: ShardInfo | str | os.PathLike[str]) -> ShardInfo:
    return info_or_path if isinstance(info_or_path, ShardInfo) else open_shards(info_or_path)


def read_shards(info_or_path: ShardInfo | str | os.PathLike[str], *, columns: list[str] | None = None,
                rank: int = 0, world_size: int = 1):
    """A Ray Dataset over the shards (files[rank::world_size]) in a fixed order.

    Args:
        info_or_path: a ShardInfo or a path accepted by `open_shards`.
        columns: columns to read (None = all).
        rank, world_size: keep every world_size-th file starting at rank (0 <= rank < world_size).
    Returns:
        ray.data.Dataset with order preserved.
    """
    import ray

    info = _info(info_or_path)
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int; got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    files = list(info.files[rank::world_size])
    if not files:
        raise ValueError(f"rank {rank} of {world_size} gets no shard file ({len(info.files)} shards in {info.path})")
    ds = ray.data.read_parquet(files, columns=columns, shuffle=None)
    ds.context.execution_options.preserve_order = True  # same row stream on every run
    return ds


def read_quarantine(info_or_path: ShardInfo | str | os.PathLike[str]) -> pa.Table:
    """The quarantine table (index, id, reason, detail) of a run, sorted by index."""
    import pyarrow.parquet as pq

    from pipelines.data.records import QUARANTINE_SCHEMA

    info = _info(info_or_path)
    tables = [pq.read_table(f).cast(QUARANTINE_SCHEMA) for f in info.quarantine_files]
    if not tables:
        return QUARANTINE_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("index")


# ----------------------------------------------------------------------------------------------------
# Micro-batches


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread, stateless hash of uint64 values (wrapping arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _row_keys(index: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    salt = int(_mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch) & _MASK64], dtype=np.uint64))[0])
    return _mix64(index.astype(np.uint64) ^ np.uint64(salt))


def _batches_of(rows: Any, batch_rows: int = 1024) -> Iterator[pa.Table | pa.RecordBatch]:
    if isinstance(rows, pa.Table | pa.RecordBatch):
        yield rows
    elif hasattr(rows, "iter_batches"):  # ray.data.Dataset / ray.data.DataIterator
        yield from rows.iter_batches(batch_size=batch_rows, batch_format="pyarrow")
    elif isinstance(rows, Iterable):
        for t in rows:
            if not isinstance(t, pa.Table | pa.RecordBatch):
                raise ValueError(f"rows must yield pyarrow Tables/RecordBatches; got {type(t).__name__}")
            yield t
    else:
        raise ValueError(f"rows must be a ray.data.Dataset, a DataIterator, a pyarrow Table or an iterable of "
                         f"them; got {type(rows).__name__}")


def _list_rows(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A list<int32> column as one int64 numpy array per row (slices of the flat values)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        if not len(chunk):
            continue
        offsets = chunk.offsets.to_numpy()
        # `values` is the whole child array even when `chunk` is a slice of a bigger block: convert only
        # this slice's range.
        lo, hi = int(offsets[0]), int(offsets[-1])
        values = chunk.values.slice(lo, hi - lo).to_numpy(zero_copy_only=False).astype(np.int64)
        out.extend(values[offsets[i] - lo:offsets[i + 1] - lo] for i in range(len(chunk)))
    return out


@dataclass
class _Row:
    index: int
    key: int
    length: int
    input_ids: np.ndarray
    labels: np.ndarray
    image: bytes | None


def _rows_of(table: pa.Table | pa.RecordBatch, image_column: str, seed: int, epoch: int) -> list[_Row]:
    missing = [c for c in (*_NEEDED, image_column) if c not in table.schema.names]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; they have {table.schema.names}")
    index = table.column("index").to_numpy()
    keys = _row_keys(index, seed, epoch)
    lengths = table.column("length").to_numpy()
    modality = table.column("modality").to_pylist()
    images = table.column(image_column).to_pylist()
    ids, labels = _list_rows(table.column("input_ids")), _list_rows(table.column("labels"))
    rows = []
    for i in range(table.num_rows):
        is_image = modality[i] == "image"
        if is_image and images[i] is None:
            raise ValueError(f"row with record index {int(index[i])} is an image row without {image_column}")
        rows.append(_Row(index=int(index[i]), key=int(keys[i]), length=int(lengths[i]), input_ids=ids[i],
                         labels=labels[i], image=images[i] if is_image else None))
    return rows


def _plan_window(rows: list[_Row], micro_batch_size: int, megabatch: int, group_by_length: bool,
                 ) -> tuple[list[list[_Row]], list[_Row]]:
    """(full micro-batches of one modality's rows, leftover rows) for one window."""
    rows = sorted(rows, key=lambda r: (r.key, r.index))
    batches: list[list[_Row]] = []
    for start in range(0, len(rows), megabatch):
        mega = rows[start:start + megabatch]
        if group_by_length:
            mega = sorted(mega, key=lambda r: (-r.length, r.key, r.index))
        batches.extend(mega[i:i + micro_batch_size] for i in range(0, len(mega), micro_batch_size))
    if batches and len(batches[-1]) < micro_batch_size:
        return batches[:-1], batches[-1]
    return batches, []


def iter_micro_batches(rows: Any, info: ShardInfo, *, micro_batch_size: int, seed: int, epoch: int,
                       window_rows: int = 4096, megabatch_factor: int = 8, group_by_length: bool = True,
                       drop_last: bool = False, image_processor=None,
                       return_index: bool = False) -> Iterator[dict[str, Any]]:
    """Modality- and length-grouped micro-batches of tensors, deterministic for (seed, epoch).

    See the module docstring for the accepted `rows`, the batch layout and the determinism contract.

    Args:
        rows: the shard rows (Dataset, DataIterator, pyarrow Table or iterable of Tables/RecordBatches).
        info: the run's ShardInfo (`open_shards`): image storage, image size, pad/image token ids.
        micro_batch_size: rows per micro-batch (>= 1).
        seed, epoch: the shuffle; a new epoch gives a new order.
        window_rows: rows grouped and shuffled together (>= micro_batch_size * megabatch_factor).
        megabatch_factor: micro-batches per length-sorted megabatch.
        group_by_length: sort megabatches by length (less padding); False keeps the hashed order.
        drop_last: drop the partial micro-batch of each modality at the end of the stream.
        image_processor: CLIP processor for "bytes" storage (default: `build_image_processor(info.image_size)`).
        return_index: also yield "index", the rows' record indices (B,) long.
    Yields:
        dict with input_ids, attention_mask, labels (B, L) long and, for image batches only,
        pixel_values (B, 3, S, S) float32 (and "index" when asked).
    """
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0),
                             ("window_rows", window_rows, 1), ("megabatch_factor", megabatch_factor, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    megabatch = micro_batch_size * megabatch_factor
    if window_rows < megabatch:
        raise ValueError(f"window_rows ({window_rows}) must be >= micro_batch_size * megabatch_factor ({megabatch})")
    if info.image_storage == "bytes" and image_processor is None:
        from dpn.image_processing import build_image_processor

        image_processor = build_image_processor(info.image_size)
    return _generate(rows, info, micro_batch_size, seed, epoch, window_rows, megabatch, group_by_length,
                     drop_last, image_processor, return_index)


def _generate(rows, info, micro_batch_size, seed, epoch, window_rows, megabatch, group_by_length, drop_last,
              image_processor, return_index) -> Iterator[dict[str, Any]]:
    carry: dict[bool, list[_Row]] = {True: [], False: []}  # has image -> leftover rows
    window: list[_Row] = []
    number = 0

    def flush(final: bool) -> Iterator[dict[str, Any]]:
        nonlocal window, number
        planned: list[list[_Row]] = []
        for has_image in (True, False):
            group = carry[has_image] + [r for r in window if (r.image is not None) == has_image]
            full, rest = _plan_window(group, micro_batch_size, megabatch, group_by_length)
            planned.extend(full)
            carry[has_image] = rest
            if final and rest and not drop_last:
                planned.append(rest)
        random.Random(f"{seed}:{epoch}:{number}").shuffle(planned)
        number += 1
        window = []
        for batch in planned:
            yield _collate_rows(batch, info, image_processor, return_index)

    for table in _batches_of(rows):
        window.extend(_rows_of(table, info.image_column, seed, epoch))
        if len(window) >= window_rows:
            yield from flush(final=False)
    yield from flush(final=True)


def _collate_rows(batch: list[_Row], info: ShardInfo, image_processor, return_index: bool) -> dict[str, Any]:
    import torch

    from dpn.collate import collate

    pixel_values: list[Any] = [None] * len(batch)
    if batch[0].image is not None:
        if info.image_storage == "bytes":
            from PIL import Image

            from dpn.image_processing import preprocess_images

            images = [Image.open(io.BytesIO(r.image)) for r in batch]
            pixel_values = list(preprocess_images(images, image_processor))  # (3, S, S) each
        else:
            s = info.image_size
            pixel_values = [torch.from_numpy(np.frombuffer(r.image, dtype=np.float32).reshape(3, s, s).copy())
                            for r in batch]
    samples = [{"input_ids": torch.from_numpy(r.input_ids), "labels": torch.from_numpy(r.labels),
                "pixel_values": pv} for r, pv in zip(batch, pixel_values, strict=True)]
    out = collate(samples, pad_token_id=info.pad_token_id, padding_side="right", image_token_id=info.image_token_id)
    if return_index:
        out["index"] = torch.tensor([r.index for r in batch], dtype=torch.long)
    return out
