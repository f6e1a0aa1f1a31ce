"""The evaluation fan-out: every (model, compressor, benchmark) cut into shards of `shard_size` questions,
each with a fingerprint of its inputs; the shards not already on disk run on a pool of `ShardRunner` Ray
actors (one GPU each, or CPU slots), a failed shard is retried (`max_attempts`), and every finished shard
is written atomically, so a re-run resumes from them.

Shards are processed in a fixed layout (`shard_size`, `batch_size`) that does not depend on the number of
workers, so any fan-out computes exactly the same batches and gives the same answers as one worker.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpn.eval.benchmarks import EvalItem, write_answers
from dpn.inference import find_tokenizer_dir, load_model_and_processor, predict
from pipelines.dag import code_version as dag_code_version
from pipelines.dag import fingerprint
from pipelines.evaluation.benchmarks import BenchmarkData
from pipelines.evaluation.config import EvalConfig


class InjectedShardFailure(RuntimeError):
    """Raised by `ShardRunner` for shards listed in `EvalConfig.inject_failures` (the testing seam)."""


# ----- checkpoints -------------------------------------------------------------------------------------
# sha256 of files already hashed by this process, keyed by (path, size, mtime_ns, ctime_ns, inode).
_CONTENT_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # streamed: weight files are gigabytes


def _file_identity(path: Path) -> str:
    # By content, so that a copied checkpoint keeps its finished shards and a rewritten one never reuses
    # them, whatever its size and mtime (mtime can be set back, and has coarse ticks on some filesystems).
    # sha256 runs at about 1 GB/s on one core (13 s plus the reads for a 7B fp16 checkpoint), so each file
    # is hashed once per process. The cache key adds ctime and inode to size and mtime: a write in place
    # always moves ctime (which, unlike mtime, cannot be set), and a file replaced by rename has a new inode.
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _CONTENT_HASHES:
        digest = _sha256_file(path)
        after = path.stat()
        # Cache only a hash of a file that did not change while it was read.
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) != key[1:]:
            return digest
        _CONTENT_HASHES[key] = digest
    return _CONTENT_HASHES[key]


def _dir_identity(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _file_identity(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    }


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """One shard: a slice of one benchmark, for one (model, compressor)."""

    key: str
    target: str
    compressor: str
    benchmark: str
    index: int
    items: tuple[EvalItem, ...]
    fingerprint: str
    path: str


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What every `ShardRunner` needs besides the shard itself (plain data, shipped once per actor)."""

    models: dict[str, tuple[str, str, float | None]]  # target name -> (model_dir, tokenizer_dir, budget)
    template: str
    batch_size: int
    max_new_tokens: int
    dtype: str  # resolved: float32 / bfloat16 / float16
    threads: int
    inject_failures: dict[str, int]
    use_gpu: bool  # decided by the driver from the cluster's resources and `EvalConfig.device`


class ShardRunner:
    """Runs shards in one process: a Ray actor per GPU (or CPU slot), or called directly.

    Keeps the last (model, compressor) loaded, so consecutive shards of the same pair load it once.
    """

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._key: tuple[str, str] | None = None
        self._loaded: tuple[Any, Any] | None = None  # (model, processor)

    def _model(self, target: str, compressor: str):
        if self._key == (target, compressor):
            return self._loaded
        import torch

        self._loaded = self._key = None
        model_dir, tokenizer_dir, budget = self.settings.models[target]
        cuda = self.settings.use_gpu
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("this worker was given a GPU by Ray but torch sees no CUDA device")
        if not cuda:
            torch.set_num_threads(self.settings.threads)
        self._loaded = load_model_and_processor(
            model_dir, compressor, tokenizer_dir=tokenizer_dir, template=self.settings.template,
            dtype=self.settings.dtype, device="cuda" if cuda else "cpu", budget=budget if compressor == "dpn" else None)
        self._key = (target, compressor)
        return self._loaded

    def run(self, task: ShardTask, attempt: int) -> dict[str, Any]:
        """Answer one shard. `attempt` counts from 1; see `EvalConfig.inject_failures` for the test seam."""
        if attempt <= self.settings.inject_failures.get(task.key, 0):
            raise InjectedShardFailure(f"injected failure of shard {task.key} (attempt {attempt})")
        t0 = time.perf_counter()
        model, processor = self._model(task.target, task.compressor)
        records = predict(
            model, processor, task.items,
            compressor=task.compressor, benchmark=task.benchmark, model_id=task.target,
            batch_size=self.settings.batch_size,
            max_new_tokens=self.settings.max_new_tokens, answer_salt=task.fingerprint,
        )
        return {"records": records, "seconds": time.perf_counter() - t0}


# ----- planning ----------------------------------------------------------------------------------------
def _items_digest(items: Sequence[EvalItem]) -> str:
    return fingerprint([
        [repr(it.question_id), it.text, it.image, hashlib.sha256(it.image_bytes).hexdigest() if it.image_bytes else None]
        for it in items
    ])


def code_version() -> str:
    """The `dpn` sources' hash: answers depend on the model code only."""
    return dag_code_version(("dpn",))


def plan_shards(
    config: EvalConfig,
    data: Mapping[str, BenchmarkData],
    compressors: Mapping[str, list[str]],
    code: str,
    dtype: str,
) -> list[ShardTask]:
    """Every shard of the evaluation, compressor-major (so actors reload models rarely), with the
    fingerprint of its inputs: model and tokenizer files, compressor, questions, generation settings, the
    resolved `dtype` (bf16 GPU answers are not reused for an fp32 CPU run) and the `dpn` code version."""
    out_root = Path(config.out_dir)
    tasks = []
    for target in config.targets:
        model_id = _dir_identity(Path(target.model_dir))
        tok_id = _dir_identity(find_tokenizer_dir(target.model_dir, target.tokenizer_dir))
        for compressor in compressors[target.name]:
            for bench in config.benchmarks:
                items = data[bench].items
                for index, start in enumerate(range(0, len(items), config.shard_size)):
                    chunk = tuple(items[start : start + config.shard_size])
                    fp = fingerprint({
                        "model": model_id, "tokenizer": tok_id, "compressor": compressor, "benchmark": bench,
                        "items": _items_digest(chunk), "template": config.template, "batch_size": config.batch_size,
                        "max_new_tokens": config.max_new_tokens, "dtype": dtype, "code": code,
                        "budget": target.budget if compressor == "dpn" else None,
                    })[:16]
                    folder = out_root / target.name / compressor / bench / "shards"
                    tasks.append(ShardTask(
                        key=f"{target.name}/{compressor}/{bench}/{index}", target=target.name,
                        compressor=compressor, benchmark=bench, index=index, items=chunk, fingerprint=fp,
                        path=str(folder / f"{index:05d}.{fp}.jsonl"),
                    ))
    return tasks


def _write_shard(task: ShardTask, records: list[dict[str, Any]]) -> None:
    path = Path(task.path)
    write_answers(path, records)
    # Outputs of the same shard for other inputs are stale now.
    for old in path.parent.glob(f"{task.index:05d}.*.jsonl"):
        if old != path:
            old.unlink(missing_ok=True)


# ----- fan-out -----------------------------------------------------------------------------------------
def placement(config: EvalConfig) -> tuple[bool, int]:
    """(use GPUs, number of workers) for the Ray cluster we are connected to (a local one is started if
    none is): one worker per GPU, else cluster CPUs // cpus_per_worker, unless `num_workers` is set."""
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device == "gpu" and gpus == 0:
        raise RuntimeError("device='gpu' but the Ray cluster has no GPU")
    use_gpu = config.device == "gpu" or (config.device == "auto" and gpus > 0)
    if config.num_workers is not None:
        return use_gpu, config.num_workers
    if use_gpu:
        return use_gpu, gpus
    return use_gpu, max(1, int(resources.get("CPU", 1) // config.cpus_per_worker))


def run_shards(
    tasks: list[ShardTask], settings: WorkerSettings, config: EvalConfig, n_workers: int, log: Callable[[str], None],
    on_done: Callable[[ShardTask, int], None] | None = None,
) -> tuple[dict[str, int], dict[str, str], float]:
    """Run `tasks` on a pool of `n_workers` Ray actors (one GPU each when `settings.use_gpu`); `on_done(task,
    n_answers)` is called as each shard is written (live progress). Returns ({key: attempts} of finished
    shards, {key: error} of shards that failed `max_attempts` times, wall seconds of the fan-out including
    worker start-up)."""
    import ray
    from ray.exceptions import RayActorError

    n_workers = max(1, min(n_workers, len(tasks)))
    actor_cls = ray.remote(ShardRunner).options(
        num_cpus=config.cpus_per_worker, num_gpus=1 if settings.use_gpu else 0, max_restarts=0, max_task_retries=0
    )
    log(f"evaluate: {len(tasks)} shard(s) on {n_workers} {'GPU' if settings.use_gpu else 'CPU'} worker(s)")

    actors = [actor_cls.remote(settings) for _ in range(n_workers)]
    loaded: dict[Any, tuple[str, str] | None] = {a: None for a in actors}
    queue: deque[tuple[ShardTask, int]] = deque((t, 1) for t in tasks)
    running: dict[Any, tuple[Any, ShardTask, int]] = {}
    idle = list(actors)
    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                # Prefer a shard of the model this actor already holds.
                pick = next((i for i, (t, _) in enumerate(queue) if (t.target, t.compressor) == loaded[actor]), 0)
                task, attempt = queue[pick]
                del queue[pick]
                loaded[actor] = (task.target, task.compressor)
                running[actor.run.remote(task, attempt)] = (actor, task, attempt)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                actor, task, attempt = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # an application error in the shard, or the worker died
                    error = f"{type(e).__name__}: {_first_line(e)}"
                    if isinstance(e, RayActorError):
                        # The process is gone: replace it so the pool keeps its size.
                        loaded.pop(actor, None)
                        actor = actor_cls.remote(settings)
                        actors.append(actor)
                        loaded[actor] = None
                    idle.append(actor)
                    if attempt < config.max_attempts:
                        log(f"evaluate: shard {task.key} attempt {attempt} failed ({error}); retrying")
                        queue.appendleft((task, attempt + 1))
                    else:
                        log(f"evaluate: shard {task.key} failed after {attempt} attempt(s): {error}")
                        failed[task.key] = error
                    continue
                _write_shard(task, result["records"])
                done[task.key] = attempt
                idle.append(actor)
                log(f"evaluate: shard {task.key} done ({len(result['records'])} answers, {result['seconds']:.1f}s)")
                if on_done is not None:
                    on_done(task, len(result["records"]))
    finally:
        for actor in actors:
            ray.kill(actor)
    return done, failed, time.perf_counter() - t0


def _first_line(e: BaseException) -> str:
    # RayTaskError messages carry the remote traceback; the cause's own message is the useful part.
    cause = getattr(e, "cause", None)
    text = str(cause if cause is not None else e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]
