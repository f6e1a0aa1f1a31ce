"""One run per work dir: an exclusive OS lock (`flock`) on `<pipeline dir>/run.lock`, held by `dpn pipeline
run` and `dpn train` (both run the DAG of `pipelines.dag` in the same directory) for their whole run.

Two runs on one work dir would delete each other's published outputs and scratch state; the second now
stops at once with `WorkDirBusy` ("work dir ... is in use by run ... (pid ..., host ..., since ...)").
The kernel releases the lock when the holding process ends, however it ends (SIGKILL, OOM kill, a node's
pod deleted), so a killed run never blocks the next one and there is no stale-lock clean-up to get wrong.
`dpn pipeline status` / `plan` only read the holder's description, they never take the lock.

Why `fcntl.flock` and not the `filelock` package: the lock file holds the holder's description, which
filelock truncates on every acquisition attempt (it opens the file with O_TRUNC), so a refused second run
would wipe what it is about to report; one `flock` call is all we need otherwise.

Network filesystems (details in docs/robustness.md): on Linux NFS clients flock is emulated with
whole-file POSIX locks, which NFSv4 enforces across clients (v3 through NLM), unless the volume is mounted
with `local_lock=flock`/`all` (then it is local to one node); a lock of a crashed client frees after the
server's lease time (NFSv4: 90 s by default). CephFS (kernel and FUSE clients) enforces flock across
clients through the MDS; a dead client's locks go when the MDS evicts its session. Lustre enforces
flock across clients only when mounted with `-o flock`; with `-o localflock` it is node-local and by
default (`noflock`) flock fails: the run then refuses to start rather than run unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
_ATTEMPTS, _RETRY_S = 10, 0.1


class WorkDirBusy(RuntimeError):
    """Another process holds the work dir's lock; the message names it."""


class WorkDirLockUnsupported(RuntimeError):
    """The work dir's filesystem refuses `flock`, so no run could be guarded against another."""


def _describe(directory: Path, info: dict[str, Any]) -> str:
    run = info.get("run") or "?"
    mlflow = f", MLflow run {info['mlflow_run_id']}" if info.get("mlflow_run_id") else ""
    return (f"work dir {directory} is in use by run {run!r}{mlflow} (pid {info.get('pid', '?')}, host "
            f"{info.get('host', '?')}, since {info.get('since', '?')}); wait for it to finish or stop it first")


def _read_info(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data.decode()) if data.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}  # written while we read, or not ours: the message says "?"


class WorkDirLock:
    """The exclusive lock of `directory` (created if missing). Use as a context manager, or `acquire()` /
    `release()`; `update(**info)` adds to the holder's description (e.g. the MLflow run id).

    Raises (from `acquire`): WorkDirBusy when another process holds it; WorkDirLockUnsupported when the
    filesystem does not support flock.
    """

    def __init__(self, directory: str | os.PathLike, run: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.info: dict[str, Any] = {"run": run, "pid": os.getpid(), "host": socket.gethostname()}
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkDirLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a contender must not wipe the holder's description (see the module docstring).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # A few tries: `holder()` (pipeline status) may probe the lock for an instant.
                    if attempt == _ATTEMPTS - 1:
                        raise
                    time.sleep(_RETRY_S)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise WorkDirBusy(_describe(self.directory, info)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise WorkDirLockUnsupported(
                    f"cannot lock work dir {self.directory}: its filesystem refuses flock ({e.strerror}); without "
                    "the lock two runs could destroy each other's outputs. Use a filesystem with cluster-wide "
                    "flock (NFSv4 without local_lock, CephFS, Lustre mounted with -o flock); see "
                    "docs/robustness.md") from None
            raise
        self._fd = fd
        self.info["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write()
        return self

    def update(self, **info: Any) -> None:
        """Add to the holder's description (written through the held descriptor: on NFS, closing any
        other descriptor of the file would drop this process's POSIX-emulated lock)."""
        self.info.update(info)
        if self._fd is not None:
            self._write()

    def _write(self) -> None:
        data = (json.dumps(self.info, sort_keys=True) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (deleting it would race a new holder)
            self._fd = None

    def __enter__(self) -> WorkDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The description of the run holding `directory`'s lock, or None when no run holds it. Takes no
    lock that could block a run: a shared, non-blocking probe, dropped at once."""
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or {"run": "?"}
        except OSError:
            return None  # no flock here: nothing can be held either
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "WorkDirBusy", "WorkDirLock", "WorkDirLockUnsupported", "holder"]
