"""What the tiny recipe's two stage-0 trainings (`pipelines.vision_pretrain`, `pipelines.llm_pretrain`)
share: running as a one-CPU Ray task, and publishing the result under its fingerprint atomically."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_FILE = "stage0.json"  # next to the saved weights: fingerprint + summary; its presence = complete


def _one_thread(fn: Callable[..., dict[str, Any]], label: str, *args: Any) -> dict[str, Any]:
    import sys

    import torch

    # A one-CPU task: more threads than CPUs slows every process on the node (25x measured on 2 cores).
    torch.set_num_threads(1)

    def progress(row: dict[str, Any]) -> None:  # Ray forwards a task's output to the driver's terminal
        shown = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[{label}] " + " ".join(f"{k}={v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    return fn(*args, on_eval=progress)


def on_one_cpu(fn: Callable[..., dict[str, Any]], label: str, *args: Any) -> dict[str, Any]:
    """`fn(*args, on_eval=...)` as a one-CPU Ray task with one torch thread (local Ray started if none is
    up), so that it shares the node with the other steps' Ray work instead of competing with it from the
    driver; every evaluation row is printed to the driver's terminal as "[label] step=... ..."."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.get(ray.remote(num_cpus=1)(_one_thread).remote(fn, label, *args))


def publish(out: Path, train: Callable[[Path], dict[str, Any]], record: dict[str, Any]
            ) -> tuple[Path, dict[str, Any], bool]:
    """The finished result at `out` (named by its fingerprint) if there is one; else `train(tmp)` writes
    it under a temporary name, `record` + the summary go to RESULT_FILE, and the directory is renamed to
    `out`, so a crash never leaves a half-written result that a later run would take. Returns (out,
    summary, whether it was cached)."""
    done = out / RESULT_FILE
    if done.is_file():
        return out, json.loads(done.read_text())["summary"], True
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    summary = train(tmp.absolute())
    (tmp / RESULT_FILE).write_text(json.dumps({"fingerprint": out.name, **record, "summary": summary}, indent=2))
    if out.exists():  # an incomplete directory from an older layout: replaced
        shutil.rmtree(out)
    tmp.rename(out)
    return out, summary, False


__all__ = ["RESULT_FILE", "on_one_cpu", "publish"]
