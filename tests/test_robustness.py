"""Safe for real use (issue #20): one run per work dir, configs and inputs checked before any work, cache keys
that follow the code a step runs, and the fault matrix of docs/robustness.md on the smallest DAG that shows
each fault (the full pipeline's killed-driver case is tests/test_pipeline.py's)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs import cli
from pipelines import code_keys, publish
from pipelines.dag import SUCCESS_FILE, Pipeline, RunHooks, Step
from pipelines.run_lock import WorkDirBusy, WorkDirLock, holder
from pipelines.workflow import PipelineConfig, build_pipeline, tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
ERR = "dpn pipeline: error: "


def _writer(text: str):
    def fn(ctx):
        (ctx.out_dir / "out.txt").write_text(text)
        return {"file": "out.txt"}

    return fn


# ----- validation first ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, field", [
    ("corpus: {n_pretrian: 5}\n", "corpus.n_pretrian: unknown field; valid: "),
    ("max_cpus: .nan\n", "max_cpus: "),
    ("train_overrides: {optim.lr: .inf}\n", "train_overrides.optim.lr: "),
    ("eval_limit: .nan\n", "eval_limit: "),
    ("name: ..\n", "name: must be a plain name"),
])
def test_bad_config_exits_2_naming_the_field_before_any_work(tmp_path, capsys, text, field):
    import ray

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    work = tmp_path / "work"
    assert cli.main(["pipeline", "run", "--config", str(bad), "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERR + field) and "Traceback" not in err, err
    assert not ray.is_initialized() and not work.exists()


def test_every_config_problem_is_reported_at_once_one_line_each(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: {n_pretrian: 5, n_eval: -1}\nmax_cpus: .nan\ntrain_overrides: {optim.lr: .inf}\n"
                   "eval_limit: .nan\nvariants: [dpn, turbo]\n")
    assert cli.main(["pipeline", "plan", "--config", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith(ERR) for line in lines), lines
    named = [line.removeprefix(ERR).split(":")[0] for line in lines]
    assert {"corpus.n_pretrian", "corpus.n_eval", "max_cpus", "train_overrides.optim.lr", "eval_limit",
            "variants"} <= set(named), lines


def test_nan_and_inf_are_refused_in_model_and_stage_configs():
    from dpn.configuration_dpn import DPNConfig
    from pipelines.recipes import get_recipe

    for name, value in (("gate_temperature", float("inf")), ("pdrop_ratio", float("nan")), ("budget", float("inf"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            DPNConfig(**{name: value})
    with pytest.raises(ValueError, match="optim.lr"):
        get_recipe("tiny", 1, ["optim.lr=nan"])
    with pytest.raises(ValueError, match="run_name"):
        get_recipe("tiny", 1, ["run_name=.."])
    with pytest.raises(ValueError, match="name: must be a plain name"):
        PipelineConfig(name="..")


def test_plan_lists_every_missing_input_of_a_real_corpus_at_once(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    record = {"id": "1", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                  {"from": "gpt", "value": "x"}]}
    (tmp_path / "pretrain.json").write_text(json.dumps([record]))
    (tmp_path / "llm").mkdir()  # a weights dir without config.json or weights
    (tmp_path / "eval" / "MME").mkdir(parents=True)  # questions there, ground truth not
    (tmp_path / "eval" / "MME" / "questions.jsonl").write_text('{"question_id": 1}\n')
    cfg = tmp_path / "real.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        recipe: llava-1.5-7b
        corpus: {{synthetic: false, pretrain_annotations: {tmp_path}/pretrain.json,
                 instruct_annotations: {tmp_path}/missing.json, image_root: {tmp_path}/images,
                 tokenizer: {tmp_path}/no-tokenizer, eval_root: {tmp_path}/eval}}
        benchmarks: [textvqa, mme]
        train_overrides: {{model.llm_path: {tmp_path}/llm}}
        """))
    assert cli.main(["pipeline", "plan", "--config", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    out = capsys.readouterr()
    problems = json.loads(out.out.strip().splitlines()[-1])["problems"]
    assert [line.removeprefix(ERR) for line in out.err.splitlines() if line.startswith(ERR)] == problems
    text = "\n".join(problems)
    for expected in ("corpus.instruct_annotations: ", "missing.json", "corpus.tokenizer: ", "no-tokenizer",
                     "corpus.image_root: none of the 1 images", "coco/1.jpg",
                     "corpus.eval_root: benchmark 'textvqa': folder", "corpus.eval_root: benchmark 'mme': no ground truth",
                     "model.llm_path: ", "holds no config.json", "holds no weights",
                     "model.vision_path: not set (the recipe's placeholder '<clip>')"):
        assert expected in text, problems


# ----- cache keys follow the code a step runs --------------------------------------------------------
def test_editing_a_scorer_reruns_evaluation_only_and_model_code_reruns_training(tmp_path, monkeypatch):
    cfg = tiny_pipeline(work_dir=str(tmp_path / "w"))
    before = build_pipeline(cfg)._fps
    # The keys read the sources under code_keys.ROOT: edit a copy of the tree, never the checkout.
    tree = tmp_path / "tree"
    for pkg in code_keys.PROJECT_PACKAGES:
        shutil.copytree(code_keys.ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_keys, "ROOT", tree)
    code_keys.module_file.cache_clear()

    def rerun_after_editing(rel: str) -> set[str]:
        path = tree / rel
        source = path.read_text()
        path.write_text(source + "\n# an edit\n")
        try:
            after = build_pipeline(cfg)._fps
        finally:
            path.write_text(source)
        return {name for name in after if after[name] != before[name]}

    try:
        assert rerun_after_editing("dpn/eval/scoring.py") == {"evaluate", "register"}
        model = rerun_after_editing("dpn/modeling_dpn.py")
        assert {"stage1", "stage2_dpn", "stage2_none", "evaluate", "register"} <= model
        assert not model & {"synth", "preprocess_pretrain", "preprocess_instruct"}, model
    finally:
        code_keys.module_file.cache_clear()  # the real tree again for the tests after this one


def test_project_code_never_imports_dpns_lazy_exports_which_the_code_keys_cannot_see():
    import ast

    import dpn

    hidden = []
    for path in [*(ROOT / "dpn").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dpn" and not node.level:
                hidden += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name in dpn._EXPORTS]
    assert not hidden, f"import these from their modules, so a step's code key covers them: {hidden}"


# ----- one run per work dir --------------------------------------------------------------------------
HOLDER = """
import sys, time
from pipelines.dag import Pipeline, Step

def slow(ctx):
    time.sleep(float(sys.argv[2]))
    (ctx.out_dir / "out.txt").write_text("first")
    return {"file": "out.txt"}

status, _, _ = Pipeline([Step(name="slow", fn=slow)], sys.argv[1]).run()
print(status, flush=True)
"""


def _start_holder(tmp_path: Path, work: Path, seconds: float) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(work), str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while holder(work) is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_a_second_run_is_refused_at_once_and_the_first_finishes_unharmed(tmp_path, capsys):
    work = tmp_path / "work"
    first = _start_holder(tmp_path, work / "pipeline", seconds=6)
    t0 = time.time()
    with pytest.raises(WorkDirBusy, match=rf"work dir .*pipeline is in use by run 'pipeline' \(pid {first.pid}, "
                                          r"host .*, since .*\)"):
        Pipeline([Step(name="slow", fn=_writer("second"))], work / "pipeline").run()
    # The CLI: exit 2 at once with that message; status and plan work while the run holds the dir.
    assert cli.main(["pipeline", "run", "--work-dir", str(work)]) == 2
    assert time.time() - t0 < 20
    err = capsys.readouterr().err
    assert err.startswith(ERR + "work dir ") and f"is in use by run 'pipeline' (pid {first.pid}, host " in err
    assert cli.main(["pipeline", "status", "--work-dir", str(work)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["running"]["pid"] == first.pid
    assert cli.main(["pipeline", "plan", "--work-dir", str(work)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["running"]["pid"] == first.pid
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and out.strip() == "succeeded", err
    (published,) = (work / "pipeline" / "steps" / "slow").glob("*/out.txt")
    assert published.read_text() == "first"
    assert holder(work / "pipeline") is None


def test_after_kill_9_the_next_run_starts_and_removes_what_the_killed_one_left(tmp_path):
    work = tmp_path / "work"
    killed = _start_holder(tmp_path, work, seconds=120)
    deadline = time.time() + 30
    while not list((work / "steps" / "slow").glob(".tmp-*")):  # the step is writing its output
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert list((work / "steps" / "slow").glob(".tmp-*"))
    # The kernel released the lock with the process: no stale lock to clear by hand.
    status, _, results = Pipeline([Step(name="slow", fn=_writer("again"))], work).run()
    assert status == "succeeded" and results[0].status == "ran"
    assert not list((work / "steps" / "slow").glob(".tmp-*")), "the killed run's temporary is removed"


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path):
    seen = []

    def probe(ctx):
        seen.append(holder(tmp_path))
        with pytest.raises(WorkDirBusy):
            WorkDirLock(tmp_path, "intruder").acquire()
        return {}

    Pipeline([Step(name="a", fn=probe)], tmp_path).run()
    assert seen[0]["run"] == "pipeline" and seen[0]["pid"] == os.getpid()
    assert holder(tmp_path) is None


# ----- the fault matrix on the smallest DAG ----------------------------------------------------------
class _Tracking(RunHooks):
    """In-memory tracking server: parent and step runs, and a switch to make it unreachable."""

    def __init__(self, down_at: str | None = None):
        self.parents, self.created, self.down_at = [], [], down_at

    def start_pipeline(self, fp, resume):
        self.parents.append(resume)
        return resume or "parent-1"

    def start_step(self, step, fp, parent, resume):
        if step.name == self.down_at:
            raise ConnectionError("tracking server http://mlflow:5000 is not reachable")
        if resume is None:
            self.created.append(step.name)
        return resume or f"run-{step.name}"


def test_tracking_server_down_mid_run_fails_the_step_keeps_the_rest_and_resumes(tmp_path):
    steps = [Step(name="a", fn=_writer("A")), Step(name="b", fn=_writer("B"), inputs=["a"])]
    down = _Tracking(down_at="b")
    status, parent, results = Pipeline(steps, tmp_path, hooks=down).run()
    by_name = {r.name: r for r in results}
    assert status == "failed" and by_name["a"].status == "ran" and by_name["b"].status == "failed"
    assert "not reachable" in by_name["b"].error
    up = _Tracking()
    status, parent2, results = Pipeline(steps, tmp_path, hooks=up).run()
    assert status == "succeeded" and parent2 == parent and up.parents == [parent]  # same parent run
    assert [r.status for r in results] == ["cached", "ran"]
    assert down.created + up.created == ["a", "b"], "one tracking run per step, none duplicated"


def test_disk_full_while_publishing_fails_cleanly_and_a_rerun_finishes(tmp_path, monkeypatch):
    steps = [Step(name="a", fn=_writer("A")), Step(name="b", fn=_writer("B"), inputs=["a"])]
    real_fsync = publish.fsync_tree

    def full(root):
        if "/steps/b/" in str(root):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(root)

    monkeypatch.setattr(publish, "fsync_tree", full)
    status, _, results = Pipeline(steps, tmp_path).run()
    assert status == "failed" and results[0].status == "ran"
    assert "disk full under" in results[1].error and "finished steps are kept" in results[1].error
    b_dir = tmp_path / "steps" / "b"
    assert not b_dir.exists() or not any(b_dir.iterdir()), "nothing half-published"
    monkeypatch.setattr(publish, "fsync_tree", real_fsync)
    status, _, results = Pipeline(steps, tmp_path).run()
    assert status == "succeeded" and [r.status for r in results] == ["cached", "ran"]
    assert json.loads((results[1].out_dir / SUCCESS_FILE).read_text())["outputs"] == {"file": "out.txt"}


def test_a_corrupt_checkpoint_is_refused_before_anything_is_unpickled(tmp_path):
    # Two ranks fill one checkpoint directory (as Ray merges their reports), each with its manifest.
    ckpt = tmp_path / "step0000004"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"rank0 weights" * 100)
    (ckpt / "train_state.json").write_text('{"step": 4}')
    publish.write_checksums(ckpt, "rank00000")
    (ckpt / "ds" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank1 optimizer" * 100)
    publish.write_checksums(ckpt, "rank00001")
    assert publish.verify_checksums(ckpt) == 5  # rank 1 also lists rank 0's files, present when it wrote

    shard = ckpt / "ds" / "zero_pp_rank_1_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    (ckpt / "train_state.json").unlink()
    with pytest.raises(publish.CorruptOutput, match=r"step0000004 is corrupt: .*train_state.json missing.*"
                                                    r"zero_pp_rank_1_optim_states.pt altered"):
        publish.verify_checksums(ckpt)
    for manifest in ckpt.glob("CHECKSUMS-*"):
        manifest.unlink()
    with pytest.raises(publish.CorruptOutput, match="has no CHECKSUMS-"):
        publish.verify_checksums(ckpt)
