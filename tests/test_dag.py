"""The workflow DAG: caching by fingerprint, atomic publish, resume, concurrency, failure handling."""

from __future__ import annotations

import json
import threading

import pytest

from pipelines.dag import SUCCESS_FILE, Pipeline, RunHooks, Step, select


def writer(text):
    def fn(ctx):
        upstream = "".join((r.out_dir / "out.txt").read_text() for r in ctx.inputs.values())
        (ctx.out_dir / "out.txt").write_text(upstream + text)
        return {"file": "out.txt", "calls": 1}

    return fn


def three_steps(cfg_b="b"):
    return [
        Step(name="a", fn=writer("A")),
        Step(name="b", fn=writer("B"), inputs=["a"], config={"x": cfg_b}),
        Step(name="c", fn=writer("C"), inputs=["b"]),
    ]


def test_second_run_is_cached_and_outputs_flow(tmp_path):
    p = Pipeline(three_steps(), tmp_path, version="v1")
    status, _, res = p.run()
    assert status == "succeeded" and [r.status for r in res] == ["ran"] * 3
    assert (p.out_dir("c") / "out.txt").read_text() == "ABC"
    status, _, res = Pipeline(three_steps(), tmp_path, version="v1").run()
    assert [r.status for r in res] == ["cached"] * 3


def test_config_change_reruns_only_downstream(tmp_path):
    Pipeline(three_steps(), tmp_path, version="v1").run()
    p = Pipeline(three_steps(cfg_b="changed"), tmp_path, version="v1")
    assert [s["action"] for s in p.plan()] == ["cached", "run", "run"]
    _, _, res = p.run()
    assert [r.status for r in res] == ["cached", "ran", "ran"]
    # a new code version invalidates everything
    assert [s["action"] for s in Pipeline(three_steps(), tmp_path, version="v2").plan()] == ["run"] * 3


def test_failure_skips_dependents_publishes_nothing_and_resume_finishes(tmp_path):
    calls = {"n": 0}

    def flaky(ctx):
        calls["n"] += 1
        (ctx.out_dir / "partial.txt").write_text("half")
        (ctx.scratch_dir / "checkpoint").write_text(str(calls["n"]))
        if calls["n"] == 1:
            raise RuntimeError("boom at step b")
        assert (ctx.scratch_dir / "checkpoint").read_text() == "2"  # scratch survived the failed attempt
        (ctx.out_dir / "out.txt").write_text("AB")
        return {}

    steps = [Step(name="a", fn=writer("A")), Step(name="b", fn=flaky, inputs=["a"]),
             Step(name="c", fn=writer("C"), inputs=["b"])]
    p = Pipeline(steps, tmp_path, version="v1")
    status, _, res = p.run()
    assert status == "failed"
    assert [r.status for r in res] == ["ran", "failed", "skipped"]
    assert "boom at step b" in res[1].error
    assert not p.out_dir("b").exists()  # nothing half-published
    assert p.status()["steps"][1]["status"] == "failed"
    status, _, res = Pipeline(steps, tmp_path, version="v1").run()
    assert status == "succeeded" and [r.status for r in res] == ["cached", "ran", "ran"]
    assert calls["n"] == 2


def test_independent_steps_run_concurrently(tmp_path):
    both = threading.Barrier(2, timeout=20)

    def meet(ctx):
        both.wait()  # only returns if the other branch runs at the same time
        return {}

    steps = [Step(name="left", fn=meet), Step(name="right", fn=meet), Step(name="join", fn=lambda c: {},
                                                                          inputs=["left", "right"])]
    status, _, _ = Pipeline(steps, tmp_path, version="v1", max_cpus=2).run()
    assert status == "succeeded"


def test_cpu_budget_serialises_big_steps(tmp_path):
    active, peak = [0], [0]
    lock = threading.Lock()

    def big(ctx):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.2)
        with lock:
            active[0] -= 1
        return {}

    steps = [Step(name=f"s{i}", fn=big, cpus=2) for i in range(3)]
    Pipeline(steps, tmp_path, version="v1", max_cpus=2).run()
    assert peak[0] == 1


def test_priority_picks_which_ready_step_gets_the_free_cpu(tmp_path):
    started = []

    def record(ctx):
        started.append(ctx.name)
        return {}

    # One CPU: the steps run one at a time, in topological order (names sorted) unless a priority says else.
    steps = [Step(name="a_short", fn=record), Step(name="b_short", fn=record), Step(name="z_long", fn=record, priority=1)]
    Pipeline(steps, tmp_path / "p", version="v1", max_cpus=1).run()
    assert started == ["z_long", "a_short", "b_short"]
    started.clear()
    steps[2].priority = 0
    Pipeline(steps, tmp_path / "q", version="v1", max_cpus=1).run()
    assert started == ["a_short", "b_short", "z_long"]


def test_hooks_see_runs_and_resume_the_parent_after_a_crash(tmp_path):
    class Rec(RunHooks):
        def __init__(self):
            self.parents, self.steps, self.cached = [], [], []

        def start_pipeline(self, fp, resume):
            self.parents.append(resume)
            return resume or "parent-1"

        def start_step(self, step, fp, parent, resume):
            self.steps.append((step.name, resume))
            return resume or f"run-{step.name}"

        def cached_step(self, step, result, parent):
            self.cached.append((step.name, result.run_id))

    killed = {"now": True}

    def b(ctx):
        # The same code on both runs (a step's code is part of its key): only the first one is "killed".
        if killed["now"]:
            raise KeyboardInterrupt  # stands in for a driver killed mid-step: no except-clause runs
        return writer("B")(ctx)

    steps = [Step(name="a", fn=writer("A")), Step(name="b", fn=b, inputs=["a"])]
    rec = Rec()
    with pytest.raises(KeyboardInterrupt):
        Pipeline(steps, tmp_path, version="v1", hooks=rec).run()
    killed["now"] = False
    rec2 = Rec()
    status, parent, _ = Pipeline(steps, tmp_path, version="v1", hooks=rec2).run()
    assert status == "succeeded" and parent == "parent-1"
    assert rec2.parents == ["parent-1"]  # the unfinished parent run is resumed, not duplicated
    assert rec2.steps == [("b", "run-b")]  # the interrupted step resumes its own run id
    assert rec2.cached == [("a", "run-a")]  # the cache hit links to the run that produced it
    meta = json.loads((Pipeline(steps, tmp_path, version="v1").out_dir("b") / SUCCESS_FILE).read_text())
    assert meta["run_id"] == "run-b"


def test_bad_graphs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown step"):
        Pipeline([Step(name="a", fn=writer("A"), inputs=["zz"])], tmp_path)
    with pytest.raises(ValueError, match="cycle"):
        Pipeline([Step(name="a", fn=writer("A"), inputs=["b"]), Step(name="b", fn=writer("B"), inputs=["a"])], tmp_path)
    with pytest.raises(ValueError, match="duplicate"):
        Pipeline([Step(name="a", fn=writer("A")), Step(name="a", fn=writer("A"))], tmp_path)


def test_select_keeps_what_the_targets_read_and_their_fingerprints(tmp_path):
    steps = [Step(name="a", fn=lambda ctx: {}), Step(name="b", inputs=["a"], fn=lambda ctx: {}),
             Step(name="c", inputs=["a"], fn=lambda ctx: {}), Step(name="d", inputs=["b", "c"], fn=lambda ctx: {})]
    assert [s.name for s in select(steps, ["b"])] == ["a", "b"]
    assert [s.name for s in select(steps, ["d"])] == ["a", "b", "c", "d"]
    whole = Pipeline(steps, tmp_path, version="v")
    part = Pipeline(select(steps, ["b"]), tmp_path, version="v")
    assert part.out_dir("b") == whole.out_dir("b")  # a selection caches exactly as the whole DAG
    with pytest.raises(ValueError, match="unknown target step.*'e'"):
        select(steps, ["e"])
