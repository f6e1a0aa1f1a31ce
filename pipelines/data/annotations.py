"""Reading LLaVA annotation files (one JSON array: LCS-558K, mix665K) without holding them in memory: one
streaming pass finds the file's hash, its record count, the images it names and the byte offset of every
top-level separator of the array, so that records can later be read back by byte range, block by block
(`block_ranges`, `read_records`), each by its own Ray task.

Text faults stay with their record: the streaming pass validates the JSON structure with every byte that
is not valid UTF-8 read as "?" (same length, so offsets hold), and `read_records` decodes each record on
its own, so an invalid byte quarantines that record only (`records.UnreadableRecord`, reason bad_text),
as does a lone surrogate escape, which the records check finds after parsing. A UTF-8 byte-order mark
at the start of the file is skipped.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

BOM = codecs.BOM_UTF8
_QMARK_ERRORS = "dpn-qmark"


def _qmark(err: UnicodeDecodeError) -> tuple[str, int]:
    return "?" * (err.end - err.start), err.end  # one "?" per bad byte: offsets stay those of the file


class _ScanReader:
    """The file as the streaming parser reads it: every raw byte hashed and fed to the ArraySplitter, and
    handed to the parser with invalid UTF-8 bytes replaced by "?" (the per-record read reports them)."""

    def __init__(self, f, offset: int = 0, prefix: bytes = b""):
        self._f = f
        self.sha = hashlib.sha256(prefix)
        self.splitter = ArraySplitter(offset)
        codecs.register_error(_QMARK_ERRORS, _qmark)  # idempotent
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_QMARK_ERRORS)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.splitter.feed(data)
        # Incremental: a character cut by the chunk boundary is completed by the next chunk.
        return self._decoder.decode(data, final=not data).encode("utf-8")


class ArraySplitter:
    """Finds the byte offsets of a JSON array's top-level separators (its `[`, the `,` between elements,
    its `]`) from the chunks of the file as they stream past, so blocks of records can be read back by
    byte range. ijson validates the file but reports no byte positions; this runs on the very chunks
    ijson parses and its result is used only when ijson accepted the file. In valid JSON a byte is
    structural iff it lies outside strings, and a quote closes a string iff an even run of backslashes
    precedes it; both are computed with numpy, about as fast as ijson parses.
    """

    def __init__(self, offset: int = 0) -> None:
        import numpy as np

        self._np = np
        # delta of the bracket depth per byte value: [ { open, ] } close.
        self._delta = np.zeros(256, np.int8)
        for ch, d in ((b"[", 1), (b"{", 1), (b"]", -1), (b"}", -1)):
            self._delta[ch[0]] = d
        self._pos = offset  # file offset of the next chunk
        self._in_string = False  # the previous chunk ended inside a string
        self._backslashes = 0  # length of the backslash run that ended the previous chunk
        self._depth = 0  # bracket depth after the previous chunk
        self._found: list[Any] = []  # int64 arrays of separator offsets, per chunk
        self.seconds = 0.0  # time spent here (the benchmark adds it to the Ray Data time)

    def feed(self, chunk: bytes) -> None:
        np = self._np
        start = time.perf_counter()
        b = np.frombuffer(chunk, np.uint8)
        quotes = np.flatnonzero(b == ord('"'))
        # A quote right after a backslash is escaped iff the backslash run before it is odd.
        after_backslash = np.zeros(quotes.size, bool)
        inner = quotes > 0
        after_backslash[inner] = b[quotes[inner] - 1] == ord("\\")
        if quotes.size and quotes[0] == 0:
            after_backslash[0] = self._backslashes > 0
        candidates = np.flatnonzero(after_backslash)
        if candidates.size:
            q = quotes[candidates]
            plain = np.flatnonzero(b != ord("\\"))  # non-empty: it holds the quotes
            last = np.searchsorted(plain, q) - 1  # the last non-backslash before q, if in this chunk
            run = np.where(last >= 0, q - 1 - plain[np.maximum(last, 0)], q + self._backslashes)
            quotes = np.delete(quotes, candidates[run % 2 == 1])
        marks = np.flatnonzero((self._delta[b] != 0) | (b == ord(",")))
        # Outside strings: an even number of string quotes before the byte (counting the carry).
        marks = marks[(np.searchsorted(quotes, marks) + self._in_string) % 2 == 0]
        kind = b[marks]
        delta = self._delta[kind].astype(np.int64)
        depth_before = np.cumsum(delta) - delta + self._depth
        is_sep = (((kind == ord("[")) & (depth_before == 0)) | ((kind == ord(",")) & (depth_before == 1))
                  | ((kind == ord("]")) & (depth_before == 1)))
        self._found.append(marks[is_sep] + self._pos)
        self._depth += int(delta.sum())
        self._in_string = bool((quotes.size + self._in_string) % 2)
        rest = chunk.rstrip(b"\\")
        self._backslashes = len(chunk) - len(rest) + (0 if rest else self._backslashes)
        self._pos += len(chunk)
        self.seconds += time.perf_counter() - start

    def separators(self):
        """int64 offsets [open, comma, ..., comma, close]: element i lies strictly between entries i and
        i + 1 (for an empty array: [open, close] and no element)."""
        np = self._np
        return np.concatenate(self._found) if self._found else np.zeros(0, np.int64)


@dataclass(kw_only=True)
class AnnotationsScan:
    """What one streaming pass over the annotations file found."""

    sha256: str
    count: int
    """Number of array elements (records, good or bad)."""
    images: list[str]
    """Sorted unique image paths of the object records."""
    separators: Any
    """int64 array of count + 1 byte offsets: record i lies strictly between separators[i] and [i + 1]."""
    split_s: float
    """Seconds spent finding the separators."""


def scan_annotations_file(path: str | os.PathLike[str]) -> AnnotationsScan:
    """Stream the annotations once with ijson: their hash, record count, image paths and the byte
    offsets that cut them into records. Raises ValueError when the file is not one well-formed JSON
    array."""
    import ijson

    count, images = 0, set()
    with open(path, "rb") as f:
        start = len(BOM) if f.read(len(BOM)) == BOM else 0
        f.seek(start)
        reader = _ScanReader(f, offset=start, prefix=BOM if start else b"")
        try:
            _check_array_start(f)
            for item in ijson.items(reader, "item", use_float=True, buf_size=1 << 20):
                count += 1
                if isinstance(item, dict) and isinstance(item.get("image"), str):
                    images.add(item["image"])
        except ijson.JSONError as e:
            raise ValueError(f"annotations {str(path)!r} is not valid JSON (after {count} records): {e}") from None
    separators = reader.splitter.separators()
    if len(separators) != max(count, 1) + 1:
        # Cannot happen for a file ijson accepted; never cut records at wrong offsets.
        raise RuntimeError(f"annotations {str(path)!r}: found {len(separators)} array separators for "
                           f"{count} records")
    return AnnotationsScan(sha256=reader.sha.hexdigest(), count=count, images=sorted(images),
                           separators=separators, split_s=reader.splitter.seconds)


def _check_array_start(f) -> None:
    """The file must be one JSON array (LLaVA's layout), not JSON lines or an object."""
    position = f.tell()
    head = f.read(4096).lstrip(b" \t\r\n")
    f.seek(position)
    if not head.startswith(b"["):
        raise ValueError(f"annotations must be one JSON array (LLaVA layout); the file starts with {head[:40]!r}")


def block_ranges(separators, block_rows: list[int]) -> list[tuple[int, int, int, int]]:
    """(first record, record count, start byte, end byte) of each block: its records lie in bytes
    [start, end) of the annotations, from after the separator before the first to the one after the last."""
    ranges, first = [], 0
    for n in block_rows:
        ranges.append((first, n, int(separators[first]) + 1, int(separators[first + n])))
        first += n
    return ranges


def read_records(path: str | os.PathLike[str], separators: list[int]) -> list[Any]:
    """The records between consecutive `separators` (file offsets of top-level separators, a slice of
    `AnnotationsScan.separators`: record i lies strictly between separators[i] and [i + 1]), each decoded
    and parsed on its own. A record that is not valid UTF-8 (or not JSON by itself) comes back as a
    `records.UnreadableRecord` naming the fault, in its place: one bad byte costs one record."""
    from pipelines.data.records import UnreadableRecord

    first, last = int(separators[0]) + 1, int(separators[-1])
    with open(path, "rb") as f:
        f.seek(first)
        data = f.read(last - first)
    records: list[Any] = []
    for a, b in zip(separators[:-1], separators[1:], strict=True):
        raw = data[int(a) + 1 - first : int(b) - first]
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            records.append(UnreadableRecord(f"byte 0x{raw[e.start]:02x} at offset {int(a) + 1 + e.start} of the file is "
                                            f"not valid UTF-8 ({e.reason})"))
        except ValueError as e:  # the file parsed as a whole, so this record only
            records.append(UnreadableRecord(f"not valid JSON on its own: {e}"))
    return records


def peek_records(path: str | os.PathLike[str], n: int) -> list[Any]:
    """The first `n` records of the annotations, read as preprocessing reads them (a preflight check):
    ValueError when the file is not a JSON array or its beginning does not parse."""
    import ijson

    out: list[Any] = []
    with open(path, "rb") as f:
        start = len(BOM) if f.read(len(BOM)) == BOM else 0
        f.seek(start)
        _check_array_start(f)
        try:
            for item in ijson.items(_ScanReader(f, offset=start), "item", use_float=True):
                out.append(item)
                if len(out) >= n:
                    break
        except ijson.JSONError as e:
            raise ValueError(f"annotations {str(path)!r} is not valid JSON (after {len(out)} records): {e}") from None
    return out
