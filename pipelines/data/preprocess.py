"""`dpn preprocess`: a LLaVA annotations file + its images -> validated, tokenized Parquet shards, with Ray Data.

Data flow:

    driver: annotations.json --ijson (streaming)--> sha256, record count, image paths, and the byte
            offset of every top-level separator of the array (`_ArraySplitter`, fed the same chunks)
    Ray Data read tasks, one per block of <= rows_per_shard consecutive records (1 CPU each):
            read the block's byte range --ijson--> records --RecordProcessor--> validate, tokenize,
            decode/check the image --> the block's shard + quarantine file; only counts flow back

The LLaVA files are one JSON array (~1 GB for mix665K): Arrow's JSON reader does not take an array and
`json.load` would build ~10 GB of Python objects, so the driver streams the array with ijson once and
each Ray Data block parses only its own byte range; nobody holds the whole file. Every block is known
when the run starts, so Ray Data keeps every CPU busy from the first moment with one kind of task (an
earlier layout, one streaming parser task feeding processing tasks, left a CPU idle at the start and
cost a third process: see bench/RESULTS_preprocess.md).

Output, published atomically (written under `OUT/.tmp-*`, then renamed):

    OUT/<fingerprint>/shards/part-<first index>.parquet      `records.SHARD_SCHEMA`
    OUT/<fingerprint>/quarantine/part-<first index>.parquet  `records.QUARANTINE_SCHEMA` (index, id, reason, detail)
    OUT/<fingerprint>/manifest.json                          config, fingerprint inputs, counts, token ids
    OUT/LATEST                                               the fingerprint of the last published run

The fingerprint is a sha256 over the annotations bytes, the referenced images, the tokenizer files,
the template and every option that shapes a row, and the code version (the sources that shape a row
plus the library versions that decode/tokenize). A re-run with the same inputs finds the published
directory and does nothing; a changed input gets a new directory, so old and new shards never mix.
Images are identified by (path, size, mtime) by default, as make and rsync do: reading every image of
a 665K corpus twice (once to hash, once to process) doubles the I/O; `image_identity="content"` hashes
their bytes instead.

On a multi-node cluster the annotations, images, tokenizer and OUT must be on a filesystem every node
sees (the read and processing tasks open them by path; the driver publishes what the tasks wrote).

Image storage: "bytes" (default) keeps each original file and its geometry; the loader decodes and
pads/resizes/normalises at batch time with `dpn.image_processing`, the same code evaluation runs.
"pixels" stores the processed float32 tensor. See bench/RESULTS_preprocess.md for the measurements
behind the default.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpn.conversation import TEMPLATES
from dpn.image_io import MAX_IMAGE_BYTES, ImageFileError, read_image_file
from pipelines.data.annotations import AnnotationsScan, block_ranges, read_records, scan_annotations_file
from pipelines.data.records import IMAGE_STORAGES, QUARANTINE_REASONS, RecordError, resolve_image_path
from pipelines.publish import fsync_tree

# Bump when the shard layout or the meaning of a column changes (also part of the fingerprint).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
SHARDS_DIR = "shards"
QUARANTINE_DIR = "quarantine"
IMAGE_IDENTITIES = ("stat", "content")

# Libraries whose version can change decoded pixels or token ids.
_LIBRARIES = ("PIL", "tokenizers", "transformers", "torch", "numpy")


@dataclass(kw_only=True)
class PreprocessConfig:
    """One preprocessing run. Paths are checked when the config is built."""

    annotations: str
    """LLaVA annotations: one JSON array of {id, [image], conversations} records."""
    image_root: str
    """Directory the records' relative `image` paths are resolved against."""
    tokenizer: str
    """Directory of a saved fast tokenizer holding `<image>` (and `<ROUTER>` with add_router_token)."""
    template: str
    """Conversation template: "plain" (stage 1) or "vicuna_v1" (stage 2)."""
    out: str
    """Output root; the run publishes OUT/<fingerprint>/."""
    image_size: int
    """Side of the model's square input image (pixels mode resizes to it; recorded in the manifest)."""
    num_image_tokens: int
    """Visual tokens per image: `<image>` becomes this many image token ids in input_ids."""
    add_router_token: bool = False
    """DPN: append `<ROUTER>` to every human turn of image records."""
    image_storage: str = "bytes"
    """"bytes": the original file + geometry; "pixels": the processed float32 (3, S, S) tensor."""
    min_image_side: int = 1
    """Images with a side below this are quarantined (image_too_small)."""
    max_image_side: int = 20000
    """Images with a side above this are quarantined (image_too_large)."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are quarantined before decoding (PIL's decompression-bomb limit)."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Image files larger than this are quarantined unread (image_too_large)."""
    follow_symlinks_outside_root: bool = False
    """Read images through symlinks that lead outside image_root (an operator's `coco -> /data/coco`);
    otherwise they are quarantined (image_outside_root)."""
    max_length: int | None = None
    """Records with more tokens (image tokens included) are quarantined (too_long); None = no limit."""
    rows_per_shard: int = 1024
    """Most records per block (= per shard file); small corpora get smaller blocks to use all CPUs."""
    image_identity: str = "stat"
    """How images enter the fingerprint: "stat" = (path, size, mtime_ns), "content" = sha256 of bytes."""
    num_cpus: int | None = None
    """CPUs for `ray.init` when Ray is not initialised yet (None = all); an existing session is reused."""

    def __post_init__(self) -> None:
        for name in ("annotations", "image_root", "tokenizer", "out"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise ValueError(f"{name} must be a path; got {value!r}")
            setattr(self, name, str(Path(value).expanduser().absolute()))
        if not Path(self.annotations).is_file():
            raise ValueError(f"annotations {self.annotations!r} is not a file")
        if not Path(self.image_root).is_dir():
            raise ValueError(f"image_root {self.image_root!r} is not a directory")
        if not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {self.tokenizer!r} must be a directory holding tokenizer.json "
                             f"(a saved fast tokenizer)")
        for name, valid in (("template", tuple(TEMPLATES)), ("image_storage", IMAGE_STORAGES),
                            ("image_identity", IMAGE_IDENTITIES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}; got {getattr(self, name)!r}")
        for name in ("image_size", "num_image_tokens", "min_image_side", "max_image_side", "max_image_pixels",
                     "max_image_bytes", "rows_per_shard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.min_image_side > self.max_image_side:
            raise ValueError(f"min_image_side ({self.min_image_side}) must be <= max_image_side ({self.max_image_side})")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length <= self.num_image_tokens):
            raise ValueError(f"max_length must be None or an int > num_image_tokens ({self.num_image_tokens}); "
                             f"got {self.max_length!r}")
        if self.num_cpus is not None and (isinstance(self.num_cpus, bool) or not isinstance(self.num_cpus, int)
                                          or self.num_cpus < 1):
            raise ValueError(f"num_cpus must be None or an int >= 1; got {self.num_cpus!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out {self.out!r} exists and is not a directory")
        for name in ("add_router_token", "follow_symlinks_outside_root"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")

    def row_options(self) -> dict[str, Any]:
        """The options that shape a shard row (part of the fingerprint; paths and CPUs are not)."""
        return {
            "template": self.template, "image_size": self.image_size, "num_image_tokens": self.num_image_tokens,
            "add_router_token": self.add_router_token, "image_storage": self.image_storage,
            "min_image_side": self.min_image_side, "max_image_side": self.max_image_side,
            "max_image_pixels": self.max_image_pixels, "max_length": self.max_length,
            "max_image_bytes": self.max_image_bytes, "follow_symlinks_outside_root": self.follow_symlinks_outside_root,
        }


@dataclass(kw_only=True)
class PreprocessSummary:
    """What a run did; `to_json()` is the last stdout line of `dpn preprocess`."""

    rows_in: int
    rows_out: int
    quarantined: dict[str, int]
    """reason -> count (only reasons that occurred)."""
    shards: int
    fingerprint: str
    seconds: float
    """Wall time of this call (fingerprinting included)."""
    rows_per_s: float | None
    """rows_in / seconds of this call; None when it reused a published output (nothing processed)."""
    path: str
    """The published directory OUT/<fingerprint> (give it to `pipelines.data.loader`)."""
    reused: bool
    images_out: int
    image_storage: str
    shard_bytes: int
    driver_peak_rss_mib: float
    """Peak resident memory of this (driver) process so far."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d.update(d.pop("extra"))
        return json.dumps(d, sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# Fingerprint


def _images_digest(image_root: Path, images: list[str], identity: str, max_bytes: int) -> str:
    h = hashlib.sha256()
    for rel in images:
        try:
            path = resolve_image_path(image_root, rel)
        except RecordError:
            h.update(f"{rel}\0outside\n".encode())
            continue
        try:
            st = path.stat()
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
            continue
        if identity == "stat" or not stat.S_ISREG(st.st_mode):  # never open a FIFO or device: it may block
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            try:
                digest = hashlib.sha256(read_image_file(path, max_bytes=max_bytes)).hexdigest()
            except ImageFileError as e:
                digest = f"unreadable:{e.reason}"
            h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def _dir_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def code_version() -> dict[str, str]:
    """Hash of the sources that shape a row, plus the versions of the libraries that decode/tokenize."""
    import importlib.metadata

    from pipelines.code_keys import code_key

    # The sources that shape a row: this module and every project module it imports, transitively.
    h = hashlib.sha256(f"format={FORMAT_VERSION}".encode())
    h.update(code_key(["pipelines.data.preprocess"])[0].encode())
    versions = {}
    for lib in _LIBRARIES:
        dist = {"PIL": "pillow"}.get(lib, lib)
        try:
            versions[lib] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = "absent"
    return {"sources": h.hexdigest(), **versions}


def fingerprint_inputs(cfg: PreprocessConfig) -> tuple[str, dict[str, Any], AnnotationsScan]:
    """(fingerprint, its components, the scan of the annotations) for `cfg`. Reads the annotations once
    and stats (or hashes) every referenced image."""
    scan = scan_annotations_file(cfg.annotations)
    images = scan.images
    components = {
        "format": FORMAT_VERSION,
        "annotations_sha256": scan.sha256,
        "images": {"identity": cfg.image_identity, "count": len(images),
                   "digest": _images_digest(Path(cfg.image_root), images, cfg.image_identity, cfg.max_image_bytes)},
        "tokenizer_sha256": _dir_digest(Path(cfg.tokenizer)),
        "options": cfg.row_options(),
        "code": code_version(),
    }
    blob = json.dumps(components, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24], components, scan


# ----------------------------------------------------------------------------------------------------
# Ray Data pieces (module level: Ray pickles them by reference into the workers)


@dataclass(frozen=True, kw_only=True)
class _WorkerSpec:
    """Everything a processing task needs to build its RecordProcessor (cached per worker process)."""

    tokenizer: str
    image_root: str
    template: str
    num_image_tokens: int
    add_router_token: bool
    image_storage: str
    image_size: int
    min_image_side: int
    max_image_side: int
    max_image_pixels: int
    max_length: int | None
    max_image_bytes: int
    follow_symlinks_outside_root: bool

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> _WorkerSpec:
        return cls(tokenizer=cfg.tokenizer, image_root=cfg.image_root, template=cfg.template,
                   num_image_tokens=cfg.num_image_tokens, add_router_token=cfg.add_router_token,
                   image_storage=cfg.image_storage, image_size=cfg.image_size, min_image_side=cfg.min_image_side,
                   max_image_side=cfg.max_image_side, max_image_pixels=cfg.max_image_pixels,
                   max_length=cfg.max_length, max_image_bytes=cfg.max_image_bytes,
                   follow_symlinks_outside_root=cfg.follow_symlinks_outside_root)


@functools.lru_cache(maxsize=4)
def build_processor(spec: _WorkerSpec):
    """The RecordProcessor of `spec`, loaded once per process (Ray reuses worker processes)."""
    from dpn.image_processing import build_image_processor
    from dpn.tokenizer import load_tokenizer
    from pipelines.data.records import RecordProcessor

    return RecordProcessor(
        tokenizer=load_tokenizer(spec.tokenizer), template=spec.template, num_image_tokens=spec.num_image_tokens,
        add_router_token=spec.add_router_token, image_root=spec.image_root, image_storage=spec.image_storage,
        image_processor=build_image_processor(spec.image_size) if spec.image_storage == "pixels" else None,
        min_image_side=spec.min_image_side, max_image_side=spec.max_image_side,
        max_image_pixels=spec.max_image_pixels, max_length=spec.max_length, max_image_bytes=spec.max_image_bytes,
        follow_symlinks_outside_root=spec.follow_symlinks_outside_root,
    )


def _process_range(path: str, first: int, separators: list[int], spec: _WorkerSpec, out_dir: str) -> Iterator[Any]:
    """Read task of one block: records first .. first + len(separators) - 2, which lie between the given
    top-level separators of the annotations. Parses each on its own (`read_records`), processes them and
    writes the block's shard + quarantine files to `out_dir`; yields one row with the block's counts
    (JSON), so only counts travel back through Ray.

    Writing inside the task (instead of returning the rows to a Ray Data sink) keeps the processed rows,
    image bytes included, out of Ray's object store: they go from the processing code straight into the
    Parquet file."""
    import pyarrow as pa

    t0, cpu = time.perf_counter(), time.process_time()
    records = read_records(path, separators)
    block = build_processor(spec).process_records(range(first, first + len(records)), records)
    result = write_block(block, out_dir)
    result.update(task_s=time.perf_counter() - t0, task_cpu_s=time.process_time() - cpu)
    yield pa.table({"result": [json.dumps(result)]})


MIN_BLOCK_ROWS = 32


def plan_blocks(rows: int, cpus: int, max_rows: int, min_rows: int = MIN_BLOCK_ROWS) -> list[int]:
    """Record counts of the consecutive blocks (= read tasks = shard files) that `rows` records are cut
    into: each block takes 1/(2 * cpus) of the records still left, within [min_rows, max_rows].

    Blocks shrink towards the end (guided self-scheduling), so the CPUs finish within about one small
    block of each other instead of one of them running a last large block alone; min_rows keeps the
    per-task overhead small and max_rows (rows_per_shard) bounds the shard files."""
    if rows < 0 or cpus < 1 or max_rows < 1 or min_rows < 1:
        raise ValueError(f"plan_blocks needs rows >= 0 and cpus, max_rows, min_rows >= 1; "
                         f"got {rows}, {cpus}, {max_rows}, {min_rows}")
    sizes = []
    left = rows
    while left:
        n = min(max_rows, left, max(min_rows, math.ceil(left / (2 * cpus))))
        sizes.append(n)
        left -= n
    return sizes


def _make_datasource(path: str, separators, ranges: list[tuple[int, int, int, int]], spec: _WorkerSpec,
                     out_dir: str):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class LlavaJsonBlocks(Datasource):
        """One read task per block of consecutive records, each reading only its byte range."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None  # the output is one counts row per block

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list[ReadTask]:
            tasks = []
            for first, n, start, end in ranges:
                meta = BlockMetadata(num_rows=1, size_bytes=end - start, input_files=[path], exec_stats=None)
                block_separators = [int(x) for x in separators[first : first + n + 1]]
                tasks.append(ReadTask(functools.partial(_process_range, path, first, block_separators, spec, out_dir),
                                      meta))
            return tasks

    return LlavaJsonBlocks()


def write_block(block, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Split a processed block into its shard and quarantine files under `out_dir`; return its counts.

    File names carry the block's first record index, so they are unique and a retried task rewrites
    the same file. Image bytes are stored uncompressed (JPEG/PNG are compressed already); everything
    else with zstd."""
    import pyarrow.parquet as pq

    from pipelines.data.records import split_block

    rows, quarantine = split_block(block)
    first = min(block["index"].to_pylist(), default=0)
    name = f"part-{first:010d}.parquet"
    out = Path(out_dir)
    result: dict[str, Any] = {"shard": None, "rows": rows.num_rows, "bytes": 0, "images": 0,
                              "quarantined": dict(Counter(quarantine["reason"].to_pylist())),
                              "max_length": 0, "tokens": 0}
    if rows.num_rows:
        path = out / SHARDS_DIR / name
        compression = {c: ("none" if c == "image_bytes" else "zstd") for c in rows.column_names}
        # Row groups of <= 256 rows and ~64 MiB: a reader holds a whole row group in memory.
        row_group = max(1, min(256, (64 << 20) * rows.num_rows // max(rows.nbytes, 1)))
        pq.write_table(rows, path, compression=compression, row_group_size=row_group)
        lengths = rows["length"].to_pylist()
        result.update(shard=name, bytes=path.stat().st_size, max_length=max(lengths), tokens=sum(lengths),
                      images=rows.num_rows - rows["modality"].to_pylist().count("text"))
    if quarantine.num_rows:
        pq.write_table(quarantine, out / QUARANTINE_DIR / name, compression="zstd")
    return result


# ----------------------------------------------------------------------------------------------------
# The step


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ensure_ray(num_cpus: int | None) -> int:
    """Start a local Ray instance with `num_cpus` CPUs unless one is running; return the cluster's CPUs."""
    import ray

    if not ray.is_initialized():
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, _system_config={
            # Ray starts workers at nice 15 (background priority), so on a shared machine any foreground
            # process starves them; a local `dpn preprocess` is the foreground job (Ray Jobs set 0 too).
            "worker_niceness": 0,
        })
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _token_ids(tokenizer_dir: str, add_router_token: bool) -> dict[str, Any]:
    """The tokenizer's ids the loader and the model need; fails early if a required token is missing."""
    from dpn.constants import IMAGE_TOKEN, ROUTER_TOKEN
    from dpn.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    needed = [IMAGE_TOKEN] + ([ROUTER_TOKEN] if add_router_token else [])
    for token in needed:
        if token not in tok.all_special_tokens:
            raise ValueError(f"tokenizer {tokenizer_dir!r} lacks the special token {token!r}; add it with "
                             f"dpn.tokenizer.ensure_special_tokens and save the tokenizer again")
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir!r} has no pad token (dpn.tokenizer.ensure_special_tokens adds one)")
    return {
        "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "router_token_id": tok.convert_tokens_to_ids(ROUTER_TOKEN) if ROUTER_TOKEN in tok.all_special_tokens else None,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
    }


def _summary_from_manifest(manifest: dict[str, Any], path: Path, seconds: float, reused: bool) -> PreprocessSummary:
    c = manifest["counts"]
    return PreprocessSummary(
        rows_in=c["rows_in"], rows_out=c["rows_out"], quarantined=c["quarantined"], shards=len(manifest["shards"]),
        fingerprint=manifest["fingerprint"], seconds=round(seconds, 3),
        rows_per_s=None if reused else round(c["rows_in"] / max(seconds, 1e-9), 1), path=str(path), reused=reused,
        images_out=c["images_out"], image_storage=manifest["config"]["image_storage"],
        shard_bytes=c["shard_bytes"], driver_peak_rss_mib=round(_peak_rss_mib(), 1),
    )


def _publish_latest(out: Path, fp: str) -> None:
    tmp = out / f".{LATEST}.{secrets.token_hex(4)}"
    tmp.write_text(fp + "\n")
    os.replace(tmp, out / LATEST)  # atomic: readers see the old or the new name, never half a file


def _run_blocks(cfg: PreprocessConfig, scan: AnnotationsScan, block_rows: list[int], tmp: Path) -> list[dict[str, Any]]:
    """Process the blocks with Ray Data, one read task per block writing its shard + quarantine files under
    `tmp`; returns the blocks' counts, ordered by shard file."""
    import ray

    if not scan.count:
        return []
    ds = ray.data.read_datasource(
        _make_datasource(cfg.annotations, scan.separators, block_ranges(scan.separators, block_rows),
                         _WorkerSpec.from_config(cfg), str(tmp)),
        # One block per read task, as planned (Ray would otherwise split or merge them).
        override_num_blocks=len(block_rows),
    )
    # Without per-operator reservations Ray Data submits every CPU's task at once and queues the next
    # ones; with them it held the read operator to one running task at a time here (measured: the
    # second CPU idle) and paid a scheduling round trip between tasks. Safe: the pipeline is this one
    # operator and a queued task holds four integers.
    ds.context.op_resource_reservation_enabled = False
    results = [json.loads(row["result"]) for row in ds.iter_rows()]
    results.sort(key=lambda r: r["shard"] or "")
    return results


def _counts(results: list[dict[str, Any]], rows_in: int) -> dict[str, Any]:
    """The manifest's "counts" and "shards" from the blocks' counts. Raises RuntimeError when records were
    lost or duplicated, or a quarantine reason is unknown: such a run is never published."""
    quarantined: Counter[str] = Counter()
    for r in results:
        quarantined.update(r["quarantined"])
    rows_out = sum(r["rows"] for r in results)
    if rows_out + sum(quarantined.values()) != rows_in:
        raise RuntimeError(f"record accounting failed: {rows_in} records read, {rows_out} written + "
                           f"{sum(quarantined.values())} quarantined")
    unknown = set(quarantined) - set(QUARANTINE_REASONS)
    if unknown:
        raise RuntimeError(f"unknown quarantine reasons {sorted(unknown)}")
    shards = [{"file": r["shard"], "rows": r["rows"], "bytes": r["bytes"]} for r in results if r["shard"]]
    return {
        "counts": {
            "rows_in": rows_in, "rows_out": rows_out, "images_out": sum(r["images"] for r in results),
            "quarantined": dict(sorted(quarantined.items())), "shard_bytes": sum(s["bytes"] for s in shards),
            "tokens": sum(r["tokens"] for r in results),
            "max_length": max((r["max_length"] for r in results), default=0),
        },
        "shards": shards,
    }


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Validate, tokenize and shard a LLaVA annotations file with Ray Data (a pipeline step).

    Args:
        cfg: the run's config (see PreprocessConfig).
    Returns:
        The run summary. When OUT/<fingerprint> already exists the call only fingerprints the inputs
        and returns the published run's counts with `reused=True` (Ray is not even started).
    Raises:
        ValueError when the annotations are not one well-formed JSON array or the tokenizer lacks a
        required special token. Bad records never raise: they are quarantined.
    """
    start = time.perf_counter()
    fp, components, scan = fingerprint_inputs(cfg)
    rows_in = scan.count
    fingerprint_s = time.perf_counter() - start
    out = Path(cfg.out)
    final = out / fp
    if (final / MANIFEST).is_file():
        manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
        _publish_latest(out, fp)
        return _summary_from_manifest(manifest, final, time.perf_counter() - start, reused=True)

    token_ids = _token_ids(cfg.tokenizer, cfg.add_router_token)
    num_cpus = ensure_ray(cfg.num_cpus)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{fp}-{secrets.token_hex(4)}"
    (tmp / SHARDS_DIR).mkdir(parents=True)
    (tmp / QUARANTINE_DIR).mkdir()
    try:
        block_rows = plan_blocks(rows_in, num_cpus, cfg.rows_per_shard)
        process_start = time.perf_counter()
        results = _run_blocks(cfg, scan, block_rows, tmp)
        process_s = time.perf_counter() - process_start
        manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": fp,
            "components": components,
            "config": {**cfg.row_options(), "annotations": cfg.annotations, "image_root": cfg.image_root,
                       "tokenizer": cfg.tokenizer, "cpus": num_cpus, "blocks": len(block_rows)},
            "tokens": token_ids,
            **_counts(results, rows_in),
            "seconds": round(time.perf_counter() - start, 3),
            "fingerprint_s": round(fingerprint_s, 3),
            "split_s": round(scan.split_s, 3),
            "process_s": round(process_s, 3),
            "created_unix": time.time(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        fsync_tree(tmp)  # durable before it is visible: a power cut never leaves a renamed, empty shard
        try:
            tmp.rename(final)  # atomic publish: the directory appears complete or not at all
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run published the same fingerprint first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_latest(out, fp)
    summary = _summary_from_manifest(manifest, final, time.perf_counter() - start, reused=False)
    # Where the time went: fingerprinting (driver; of which split_s finding the record offsets) vs the Ray
    # Data pipeline (read, parse, process, write).
    summary.extra = {"fingerprint_s": round(fingerprint_s, 3), "split_s": round(scan.split_s, 4),
                     "process_s": round(process_s, 3),
                     "task_s": round(sum(r["task_s"] for r in results), 3),
                     "task_cpu_s": round(sum(r["task_cpu_s"] for r in results), 3)}
    return summary
