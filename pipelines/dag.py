"""A small cached, resumable workflow DAG.

Each step declares its inputs (upstream steps), its config section and its code. Its fingerprint is
sha256(step name, config section, the inputs' fingerprints, the key of the code it can run), so a changed
corpus, config or piece of code re-runs exactly the steps downstream of the change: the code key covers
the step function and the project modules it imports, transitively (`pipelines.code_keys`), so fixing a
scorer re-runs evaluation, not training. A step's output directory is published atomically and durably
(written under a temporary name, fsynced, renamed when the step returns: `pipelines.publish`) together
with `_SUCCESS.json`; a step whose fingerprint already has a published output is a cache hit. After a crash
or a failure, re-running the same pipeline skips everything that finished and resumes with the first
unfinished step, in the same tracking run; a step may keep resumable state (e.g. training checkpoints) in
its `scratch_dir`, which survives failed attempts.

One run per work dir: `Pipeline.run` holds the directory's OS lock (`pipelines.run_lock`) throughout, so a
second run on the same directory stops at once instead of deleting the first one's outputs; the
temporaries a killed run left behind are removed when the next run starts, under the lock.

Independent steps run concurrently on driver threads (each step's heavy work is itself distributed by
Ray), as long as the CPUs they declare fit the budget.

Nothing here knows about MLflow: the runner calls the optional `hooks` (see `RunHooks`) so that the one
tracking module stays the only place that talks to MLflow.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.code_keys import CodeRoot, code_key
from pipelines.publish import publish_dir, remove_stale, temp_sibling, write_json
from pipelines.run_lock import WorkDirLock, holder

SUCCESS_FILE = "_SUCCESS.json"


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def code_version(packages: tuple[str, ...] = ("dpn", "pipelines")) -> str:
    """Content hash of all of the packages' Python sources (what `dpn submit` names a job by; a step's cache
    key covers only the code it can run, `pipelines.code_keys`)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StepResult:
    """A finished (or cached) step as downstream steps and the summary see it."""

    name: str
    fingerprint: str
    out_dir: Path
    outputs: dict[str, Any]
    status: str  # "ran" | "cached" | "failed" | "skipped"
    seconds: float = 0.0
    run_id: str | None = None  # tracking run that produced the output
    error: str | None = None


@dataclass
class StepContext:
    """What a step function gets: where to write, what its inputs produced, where to keep resumable state."""

    name: str
    config: dict[str, Any]
    out_dir: Path  # temporary; published atomically when the step returns
    scratch_dir: Path  # survives failed attempts of the same fingerprint (checkpoints, partial shards)
    inputs: dict[str, StepResult]
    run_id: str | None  # this step's tracking run (created by the hooks), resumed across attempts
    parent_run_id: str | None


@dataclass(kw_only=True)
class Step:
    """One node of the DAG.

    Args:
        name: unique step name.
        fn: called with a `StepContext`; writes under ctx.out_dir and returns a JSON-able dict of outputs.
        inputs: names of the steps whose outputs this one reads.
        config: the step's config section; part of its fingerprint.
        cpus: CPUs the step occupies while it runs (concurrency budget), at most the runner's budget.
        priority: among steps ready at the same time, higher starts first (a long step on the critical
            path should not wait behind short ones for a CPU); not part of the fingerprint.
        code: what the step runs, for its fingerprint (`pipelines.code_keys.code_key`): functions (their
            source, the same-module code they read, the project modules they import) and module names
            (the module and its imports, transitively). Empty: `fn` itself.
    """

    name: str
    fn: Callable[[StepContext], dict[str, Any]]
    inputs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    cpus: float = 1.0
    priority: int = 0
    code: tuple[CodeRoot, ...] = ()

    def __post_init__(self) -> None:
        from pipelines.validation import check_path_component

        check_path_component("step name", self.name)  # it names a directory
        if self.cpus < 0:
            raise ValueError(f"step {self.name!r}: cpus must be >= 0, got {self.cpus}")


def select(steps: list[Step], targets: Sequence[str]) -> list[Step]:
    """The steps `targets` need: the targets and, transitively, every step they read, in the given order.
    Fingerprints depend only on a step's own inputs, so a selection runs (and caches) exactly as the whole.

    Raises:
        ValueError naming a target that is not a step.
    """
    by_name = {s.name: s for s in steps}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise ValueError(f"unknown target step(s) {unknown}; steps: {list(by_name)}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo += [i for i in by_name[name].inputs if i in by_name]
    return [s for s in steps if s.name in needed]


class RunHooks:
    """Tracking callbacks; the default does nothing. `start_step` returns the step's run id."""

    def start_pipeline(self, pipeline_fp: str, resume_run_id: str | None) -> str | None:
        return None

    def start_step(self, step: Step, fp: str, parent_run_id: str | None, resume_run_id: str | None) -> str | None:
        return None

    def end_step(self, step: Step, result: StepResult) -> None:
        pass

    def cached_step(self, step: Step, result: StepResult, parent_run_id: str | None) -> None:
        pass

    def end_pipeline(self, parent_run_id: str | None, status: str, results: list[StepResult]) -> None:
        pass


class Pipeline:
    """Runs `steps` under `work_dir` (outputs in work_dir/steps/<name>/<fingerprint>).

    `version`, when given, is mixed into every step's fingerprint (a way to invalidate everything at
    once); code changes need none: each step's key covers its own code.
    """

    def __init__(self, steps: list[Step], work_dir: str | Path, version: str | None = None, max_cpus: float = 2.0,
                 hooks: RunHooks | None = None, log: Callable[[str], None] | None = None):
        names = [s.name for s in steps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate step names: {sorted(dup)}")
        self.steps = {s.name: s for s in steps}
        for s in steps:
            missing = [i for i in s.inputs if i not in self.steps]
            if missing:
                raise ValueError(f"step {s.name!r} reads unknown step(s) {missing}; known: {names}")
            if s.cpus > max_cpus:
                raise ValueError(f"step {s.name!r} needs {s.cpus} CPUs but the budget is {max_cpus}")
        self.order = self._topological(steps)
        self.work_dir = Path(work_dir)
        self.version = version
        self.max_cpus = max_cpus
        self.hooks = hooks or RunHooks()
        self.log = log or (lambda msg: None)
        self.code_keys = {s.name: code_key(s.code or (s.fn,))[0] for s in steps}
        self._fps = self._fingerprints()
        self._lock: WorkDirLock | None = None

    # ----- structure --------------------------------------------------------------------------
    @staticmethod
    def _topological(steps: list[Step]) -> list[str]:
        deps = {s.name: set(s.inputs) for s in steps}
        order: list[str] = []
        while deps:
            ready = sorted(n for n, d in deps.items() if not d)
            if not ready:
                raise ValueError(f"the steps form a cycle: {sorted(deps)}")
            order += ready
            for n in ready:
                del deps[n]
            for d in deps.values():
                d.difference_update(ready)
        return order

    def _fingerprints(self) -> dict[str, str]:
        fps: dict[str, str] = {}
        for name in self.order:
            s = self.steps[name]
            key = {"step": name, "config": s.config, "inputs": {i: fps[i] for i in s.inputs},
                   "code": self.code_keys[name]}
            if self.version is not None:
                key["version"] = self.version
            fps[name] = fingerprint(key)[:20]
        return fps

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._fps)[:20]

    def out_dir(self, name: str) -> Path:
        return self.work_dir / "steps" / name / self._fps[name]

    def _state_file(self) -> Path:
        return self.work_dir / "pipelines" / f"{self.fingerprint}.json"

    def load_state(self) -> dict[str, Any]:
        f = self._state_file()
        return json.loads(f.read_text()) if f.is_file() else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        write_json(self._state_file(), state, indent=2, sort_keys=True)

    def _completed(self, name: str) -> StepResult | None:
        marker = self.out_dir(name) / SUCCESS_FILE
        if not marker.is_file():
            return None
        meta = json.loads(marker.read_text())
        return StepResult(name, self._fps[name], self.out_dir(name), meta["outputs"], "cached",
                          meta.get("seconds", 0.0), meta.get("run_id"))

    def plan(self) -> list[dict[str, Any]]:
        """What a run would do, without running: per step, its fingerprint and whether it is cached."""
        return [
            {"name": n, "fingerprint": self._fps[n], "inputs": self.steps[n].inputs,
             "action": "cached" if self._completed(n) else "run"}
            for n in self.order
        ]

    def status(self) -> dict[str, Any]:
        """Which steps are done, cached or failed in the latest execution, with their run ids."""
        state = self.load_state()
        steps = []
        for n in self.order:
            done = self._completed(n)
            recorded = state.get("steps", {}).get(n, {})
            steps.append({
                "name": n,
                "fingerprint": self._fps[n],
                "status": recorded.get("status") or ("done" if done else "pending"),
                "done": done is not None,
                "mlflow_run_id": (done.run_id if done else None) or recorded.get("run_id"),
                "error": recorded.get("error"),
            })
        return {"pipeline_fingerprint": self.fingerprint, "parent_run_id": state.get("parent_run_id"),
                "state": state.get("status", "never run"), "steps": steps,
                # The run holding the work dir now (any pipeline's), or None.
                "running": holder(self.work_dir)}

    # ----- one run per work dir ---------------------------------------------------------------------
    def lock(self, run: str = "pipeline") -> WorkDirLock:
        """The work dir's lock, for a caller that must hold it from before `run()` (e.g. before starting
        Ray); `run()` then keeps it. Raises `pipelines.run_lock.WorkDirBusy` when another run holds it."""
        if self._lock is None or not self._lock.held:
            self._lock = WorkDirLock(self.work_dir, run).acquire()
        return self._lock

    def _remove_stale(self) -> None:
        """Temporaries a killed run left (half-written step outputs, state files): safe under the lock only."""
        removed = remove_stale(self.work_dir / "steps", depth=2) + remove_stale(self.work_dir / "pipelines")
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) a killed run left: {[str(p) for p in removed]}")

    # ----- running ----------------------------------------------------------------------------
    def run(self) -> tuple[str, str | None, list[StepResult]]:
        """Run every step not already done, holding the work dir's lock (taken here unless `lock()` was).
        Returns (status "succeeded"|"failed", parent run id, results).

        Raises:
            pipelines.run_lock.WorkDirBusy when another run holds the work dir.
        """
        own_lock = self._lock is None or not self._lock.held
        lock = self.lock()
        try:
            return self._run(lock)
        finally:
            if own_lock:
                lock.release()

    def _run(self, lock: WorkDirLock) -> tuple[str, str | None, list[StepResult]]:
        self._remove_stale()
        state = self.load_state()
        # An execution that crashed ("running") or failed is continued, in the same tracking run: its
        # finished steps are cache hits and its unfinished ones resume their own runs.
        unfinished = state.get("status") in ("running", "failed")
        resume_parent = state.get("parent_run_id") if unfinished else None
        parent = self.hooks.start_pipeline(self.fingerprint, resume_parent)
        lock.update(mlflow_run_id=parent)
        state = {"status": "running", "parent_run_id": parent, "steps": state.get("steps", {}) if resume_parent else {},
                 "started_at": time.time()}
        self._save_state(state)
        guard = threading.Lock()
        results: dict[str, StepResult] = {}
        for n in self.order:
            done = self._completed(n)
            if done is not None:
                results[n] = done
                self._hook(f"[{n}] recording the cache hit", self.hooks.cached_step, self.steps[n], done, parent)
                state["steps"].setdefault(n, {})["status"] = "cached"
                self.log(f"[{n}] cached ({self._fps[n]}), produced by run {done.run_id}")
        self._save_state(state)

        # Stable: equal priorities keep the topological order.
        pending = sorted((n for n in self.order if n not in results), key=lambda n: -self.steps[n].priority)
        running: dict[Future, str] = {}
        used = 0.0
        with ThreadPoolExecutor(max_workers=max(1, len(pending))) as pool:
            while pending or running:
                for n in list(pending):
                    s = self.steps[n]
                    inputs = [results.get(i) for i in s.inputs]
                    if any(r is not None and r.status in ("failed", "skipped") for r in inputs):
                        pending.remove(n)
                        results[n] = StepResult(n, self._fps[n], self.out_dir(n), {}, "skipped",
                                                error="an input step failed")
                        state["steps"].setdefault(n, {})["status"] = "skipped"
                        continue
                    if any(r is None for r in inputs):
                        continue
                    if running and used + s.cpus > self.max_cpus:
                        continue
                    pending.remove(n)
                    prev_run = state["steps"].get(n, {}).get("run_id")
                    try:
                        run_id = self.hooks.start_step(s, self._fps[n], parent, prev_run)
                    except Exception as e:  # e.g. the tracking server went down: the step cannot be recorded
                        err = f"could not start the step's tracking run: {type(e).__name__}: {e}"
                        results[n] = StepResult(n, self._fps[n], self.out_dir(n), {}, "failed", error=err)
                        state["steps"][n] = {"status": "failed", "run_id": prev_run, "error": err}
                        self._save_state(state)
                        self.log(f"[{n}] failed: {err}")
                        continue
                    used += s.cpus
                    with guard:
                        state["steps"][n] = {"status": "running", "run_id": run_id}
                        self._save_state(state)
                    self.log(f"[{n}] running ({self._fps[n]})")
                    ctx = StepContext(n, s.config, self._tmp_dir(n), self.work_dir / "scratch" / n / self._fps[n],
                                      {i: results[i] for i in s.inputs}, run_id, parent)
                    running[pool.submit(self._run_one, s, ctx)] = n
                if not running:
                    continue
                done_set, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done_set:
                    n = running.pop(fut)
                    used -= self.steps[n].cpus
                    res = fut.result()
                    results[n] = res
                    self._hook(f"[{n}] closing its tracking run", self.hooks.end_step, self.steps[n], res)
                    with guard:
                        state["steps"][n] = {"status": res.status, "run_id": res.run_id, "seconds": res.seconds,
                                             "error": res.error}
                        self._save_state(state)
                    self.log(f"[{n}] {res.status} in {res.seconds:.1f}s" + (f": {res.error}" if res.error else ""))
        ordered = [results[n] for n in self.order]
        status = "failed" if any(r.status in ("failed", "skipped") for r in ordered) else "succeeded"
        state["status"] = status
        self._save_state(state)
        self._hook("closing the pipeline's tracking run", self.hooks.end_pipeline, parent, status, ordered)
        return status, parent, ordered

    def _hook(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Call a tracking hook that records what already happened: its failure (e.g. the tracking server
        went down) is logged, never allowed to undo or hide the work (the next run records it again)."""
        try:
            fn(*args)
        except Exception as e:
            self.log(f"warning: {what} failed ({type(e).__name__}: {e}); the outputs are kept")

    def _tmp_dir(self, name: str) -> Path:
        d = temp_sibling(self.out_dir(name))
        d.mkdir(parents=True)
        return d

    def _run_one(self, step: Step, ctx: StepContext) -> StepResult:
        t0 = time.time()
        try:
            ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
            outputs = step.fn(ctx) or {}
            json.dumps(outputs)  # outputs must be JSON-able: they are the step's manifest
            seconds = time.time() - t0
            meta = {"name": step.name, "fingerprint": self._fps[step.name], "outputs": outputs, "seconds": seconds,
                    "run_id": ctx.run_id, "finished_at": time.time(), "code_key": self.code_keys[step.name]}
            (ctx.out_dir / SUCCESS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            # An existing directory without a marker is a stale unpublished attempt (else it'd be cached).
            final = publish_dir(ctx.out_dir, self.out_dir(step.name))
        except Exception as e:  # a failed step is reported, its dependents skipped; nothing half-published
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
            err = f"{type(e).__name__}: {e}"
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                err += f" (disk full under {self.work_dir}: free space and run again; finished steps are kept)"
            self.log(traceback.format_exc())
            return StepResult(step.name, self._fps[step.name], self.out_dir(step.name), {}, "failed",
                              time.time() - t0, ctx.run_id, err)
        shutil.rmtree(ctx.scratch_dir, ignore_errors=True)
        return StepResult(step.name, self._fps[step.name], final, outputs, "ran", seconds, ctx.run_id)
