"""Publishing outputs atomically and durably: an output directory (a step's, a trained stage's, preprocessed
shards) is written under a temporary sibling name, every file and directory in it is fsynced, and it is
renamed into place, the parent directory fsynced after. A reader -- or the next run after a kill or a
power cut -- sees the old complete output, none, or the new complete output; never half of one.

Temporaries are named `.tmp-*` (being written) and `.old-*` (a replaced output being deleted);
`remove_stale` deletes those a killed process left behind, and must only be called by the one process
that owns the directory (the pipeline does it under its work-dir lock, `pipelines.dag`).

Checksum manifests (`write_checksums` / `verify_checksums`) go with every training checkpoint: a
DeepSpeed resume unpickles its files (weights_only=False), so they are verified first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and directory under `root` (and `root`): their data and names reach the
    disk before the rename that publishes them (without it a crash can leave a renamed, empty file)."""
    root = Path(root)
    if root.is_file():
        _fsync_path(root, directory=False)
        return
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                _fsync_path(p, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def temp_sibling(final: str | os.PathLike, tag: str = "") -> Path:
    """A fresh (not yet created) temporary path beside `final`: `.tmp-<name>[-tag]-<pid>-<random>`."""
    final = Path(final)
    tag = f"-{tag}" if tag else ""
    return final.parent / f"{TMP_PREFIX}{final.name}{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the finished directory `tmp` the output `final` (a sibling of it), atomically and durably.

    A directory cannot be renamed over a non-empty one: an existing `final` is first renamed aside
    (`.old-*`) and deleted after, so `final` is missing for the instant between the two renames (a
    reader then finds no output, never a partial one; a crash there leaves the `.old-*` for
    `remove_stale`). Raises OSError (e.g. ENOSPC from fsync) with `final` untouched.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # put the previous output back
        raise
    _fsync_path(final.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """Write `obj` as JSON to `path` atomically and durably (temporary sibling, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent, directory=True)


def remove_stale(directory: str | os.PathLike, depth: int = 1) -> list[Path]:
    """Delete the `.tmp-*` / `.old-*` entries a killed process left in `directory` (and, with depth 2,
    in its sub-directories). Only for the directory's sole owner (see the module docstring). Returns
    what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif depth > 1 and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale(entry, depth - 1)
    return removed




# ----- checksum manifests ----------------------------------------------------------------------------
CHECKSUMS_PREFIX = "CHECKSUMS-"


class CorruptOutput(RuntimeError):
    """A directory's files do not match its checksum manifests (or it has none); the message names them."""


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(directory: str | os.PathLike, writer: str) -> Path:
    """Record the sha256 of every file under `directory` (but other manifests) in `CHECKSUMS-<writer>.json`.

    Several writers may fill one directory (each DeepSpeed rank its shard, merged by Ray): each lists
    the files present when it writes, and `verify_checksums` checks every manifest. Returns its path.
    """
    directory = Path(directory)
    files = {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(CHECKSUMS_PREFIX)}
    manifest = directory / f"{CHECKSUMS_PREFIX}{writer}.json"
    write_json(manifest, {"sha256": files}, indent=1, sort_keys=True)
    return manifest


def verify_checksums(directory: str | os.PathLike) -> int:
    """Check `directory` against all its checksum manifests before anything in it is unpickled (a
    DeepSpeed checkpoint is read with weights_only=False: a truncated or altered file must never reach
    `torch.load`). Returns how many files were verified.

    Raises:
        CorruptOutput naming the directory and each missing or altered file, or saying it has no manifest.
    """
    directory = Path(directory)
    manifests = sorted(directory.glob(f"{CHECKSUMS_PREFIX}*.json"))
    if not manifests:
        raise CorruptOutput(f"checkpoint {directory} has no {CHECKSUMS_PREFIX}*.json manifest (written by an older "
                            "version or cut short): it cannot be verified, so it is not loaded")
    bad, checked = [], 0
    for manifest in manifests:
        try:
            listed = json.loads(manifest.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            bad.append(f"{manifest.name} unreadable ({type(e).__name__})")
            continue
        for rel, digest in listed.items():
            path = directory / rel
            if not path.is_file():
                bad.append(f"{rel} missing")
            elif _sha256(path) != digest:
                bad.append(f"{rel} altered (sha256 differs from {manifest.name})")
            checked += 1
    if bad:
        raise CorruptOutput(f"checkpoint {directory} is corrupt: {'; '.join(bad[:10])}"
                            f"{f' (and {len(bad) - 10} more)' if len(bad) > 10 else ''}")
    return checked


__all__ = ["CHECKSUMS_PREFIX", "OLD_PREFIX", "TMP_PREFIX", "CorruptOutput", "fsync_tree", "publish_dir", "remove_stale",
           "temp_sibling", "verify_checksums", "write_checksums", "write_json"]
