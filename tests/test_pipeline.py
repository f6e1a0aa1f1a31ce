"""The whole DAG on CPU: a driver killed mid-run resumes without recomputing or duplicating runs, a
down tracking server fails before any work, the registry gate decides on scores and FLOPs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.registry import promotion_decision
from pipelines.workflow import PipelineConfig, load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
DPN = str(Path(sys.executable).parent / "dpn")

# The smallest pipeline that still exercises every step: two variants, two optimizer steps a stage.
SMALL = """
corpus: {n_pretrain: 64, n_instruct: 64, n_eval: 15, n_calibration: 15}
variants: [dpn, none]
routing: {samples: 8, fit_steps: 20}
train_overrides: {optim.max_steps: 2, optim.global_batch_size: 16, vision_pretrain.steps: 3,
                  vision_pretrain.batch_size: 4, vision_pretrain.eval_images: 4, llm_pretrain.steps: 3,
                  llm_pretrain.bare_steps: 1, llm_pretrain.eval_questions: 5}
"""


def small_config(tmp_path: Path) -> Path:
    f = tmp_path / "pipeline.yaml"
    f.write_text(SMALL)
    return f


def env_for(work_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                "RAY_USAGE_STATS_ENABLED": "0"}, **extra)
    return env


def state_of(work_dir: Path) -> dict:
    files = sorted((work_dir / "pipeline" / "pipelines").glob("*.json"))
    return json.loads(files[-1].read_text()) if files else {}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_killed_driver_resumes_without_recomputing_or_duplicate_runs(tmp_path):
    cfg = small_config(tmp_path)
    work = tmp_path / "work"
    cmd = [DPN, "pipeline", "run", "--config", str(cfg), "--work-dir", str(work)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env_for(work), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    # Kill the whole driver (and the local Ray it started) once stage 1 is training.
    deadline = time.time() + 420
    while time.time() < deadline:
        st = state_of(work).get("steps", {})
        if st.get("stage1", {}).get("status") == "running" and (work / "pipeline" / "scratch" / "stage1").exists():
            time.sleep(8)
            break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(1)
    else:
        pytest.fail("stage1 never started")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = state_of(work)
    done_before = {n for n, s in before["steps"].items() if s["status"] == "ran"}
    assert {"synth", "stage0_vision", "stage0_llm", "preprocess_pretrain"} <= done_before
    assert before["status"] == "running"

    again = subprocess.run(cmd, cwd=ROOT, env=env_for(work), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    summary = last_json(again.stdout)
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert all(statuses[n] == "cached" for n in done_before), statuses
    assert statuses["stage1"] == "ran" and statuses["register"] == "ran"
    assert summary["parent_run_id"] == before["parent_run_id"], "the interrupted parent run must be resumed"
    assert set(summary["results"]) == {"dpn", "none"}
    manifest = json.loads(next((work / "pipeline" / "steps" / "synth").glob("*/corpus/manifest.json")).read_text())
    assert 0 < summary["synthetic_chance_pct"] == round(100 * manifest["eval"]["uniform_chance"], 2) < 100
    assert summary["synthetic_chance_by_category_pct"] == {
        k: round(100 * v["chance"], 2) for k, v in manifest["eval"]["categories"].items()}
    for row in summary["results"].values():
        assert 0.0 <= row["accuracy"]["synthetic"] <= 100.0 and row["prefill_tflops_per_sample"] > 0
    assert summary["results"]["dpn"]["prefill_tflops_per_sample"] < summary["results"]["none"]["prefill_tflops_per_sample"]
    routing = summary["routing"]  # the registered (dpn) variant's routing, levels easiest first
    assert list(routing["path_share_by_difficulty"]) == ["easy", "medium", "hard"]
    assert list(routing["mean_tflops_by_difficulty"]) == ["easy", "medium", "hard"]
    assert sum(routing["path_share"].values()) == pytest.approx(1.0)
    for shares in routing["path_share_by_difficulty"].values():
        assert sum(shares.values()) == pytest.approx(1.0)

    from pipelines import registry, tracking

    uri = summary["tracking_uri"]
    children = tracking.child_runs(summary["parent_run_id"], tracking_uri=uri)
    names = [c["run_name"] for c in children if c["run_name"] in statuses]
    assert sorted(names) == sorted(set(names)), f"duplicate step runs: {names}"
    assert set(names) == set(statuses), "every step has exactly one child run"
    stage1 = next(c for c in children if c["run_name"] == "stage1")
    assert stage1["run_id"] == before["steps"]["stage1"]["run_id"], "the killed step's run is resumed"
    assert tracking.metric_history(stage1["run_id"], "loss/lm", tracking_uri=uri)
    champion = tracking.get_alias("dpn", registry.CHAMPION, tracking_uri=uri)
    assert champion is not None and champion["tags"]["compressor"] == "dpn"
    # The champion is the calibrated model as a pyfunc (pipelines/serving.py), its HF directory inside.
    assert f"/{tracking.PYFUNC_ARTIFACT}/" in champion["source"]
    hf_dir = tracking.download_model("dpn", alias=registry.CHAMPION, dst_dir=tmp_path / "champion", tracking_uri=uri)
    assert json.loads((hf_dir / "config.json").read_text())["compressor"] == "dpn"

    # A second run is all cache hits and returns in seconds.
    t0 = time.time()
    third = subprocess.run(cmd, cwd=ROOT, env=env_for(work), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert {s["status"] for s in last_json(third.stdout)["steps"]} == {"cached"}
    assert time.time() - t0 < 120


def test_tracking_server_down_fails_before_any_work(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    work = tmp_path / "work"
    out = subprocess.run([DPN, "pipeline", "run", "--config", str(small_config(tmp_path)), "--work-dir", str(work)],
                         cwd=ROOT, env=env_for(work, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    assert f"127.0.0.1:{port}" in out.stderr and "not reachable" in out.stderr
    assert not (work / "pipeline" / "steps").exists(), "no step may start when tracking is down"


def test_plan_lists_the_dag_and_bad_configs_name_the_field(tmp_path):
    out = subprocess.run([DPN, "pipeline", "plan", "--config", str(small_config(tmp_path)), "--work-dir",
                          str(tmp_path / "w")], cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    plan = last_json(out.stdout)["steps"]
    names = [s["name"] for s in plan]
    assert {"synth", "stage0_vision", "stage0_llm", "preprocess_pretrain", "preprocess_instruct",
            "preprocess_instruct_router", "preprocess_calibration", "stage1", "stage2_dpn", "stage2_none",
            "route_calibrate", "evaluate", "register"} == set(names)
    assert all(s["action"] == "run" for s in plan)
    assert names.index("synth") < names.index("stage0_llm") < names.index("stage1")
    assert names.index("stage0_vision") < names.index("stage1") < names.index("stage2_dpn") < names.index("evaluate") < names.index("register")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [dpn, turbo]\n")
    with pytest.raises(ValueError, match="turbo"):
        load_pipeline_config(None, str(bad))
    # A config file may name the pipeline and its training recipe (the recipe's own values are defaults).
    named = tmp_path / "named.yaml"
    named.write_text("name: nightly\ntrain_recipe: tiny\nregistered_model: dpn-nightly\n")
    cfg = load_pipeline_config(None, str(named))
    assert (cfg.name, cfg.train_recipe, cfg.registered_model) == ("nightly", "tiny", "dpn-nightly")
    assert load_pipeline_config("llava-1.5-7b", None).registered_model == "dpn-llava-1.5-7b"
    bad.write_text("varients: [dpn]\n")
    with pytest.raises(ValueError, match="varients"):
        load_pipeline_config(None, str(bad))


def test_promotion_gate_needs_a_better_score_at_no_more_flops():
    assert promotion_decision({"score": 50.0, "tflops": 1.0}, None)[0]
    assert promotion_decision({"score": 51.0, "tflops": 1.0}, {"score": 50.0, "tflops": 1.0})[0]
    assert not promotion_decision({"score": 50.0, "tflops": 0.5}, {"score": 50.0, "tflops": 1.0})[0]
    keep, why = promotion_decision({"score": 60.0, "tflops": 1.2}, {"score": 50.0, "tflops": 1.0})
    assert not keep and "TFLOPs" in why


def test_pipeline_config_validates_eagerly():
    with pytest.raises(ValueError, match="corpus.pretrain_annotations is required"):
        PipelineConfig(name="x", corpus={"synthetic": False})
    with pytest.raises(ValueError, match="eval_limit"):
        PipelineConfig(name="x", eval_limit=0)


def test_tiny_pipeline_trains_variants_side_by_side_with_stage0_first(tmp_path):
    from pipelines.workflow import build_pipeline, tiny_pipeline

    cfg = tiny_pipeline(work_dir=str(tmp_path))
    assert cfg.variants == ["dpn", "none"] and cfg.train_overrides == {"scaling.num_workers": 1}
    steps = build_pipeline(cfg).steps
    # One worker per stage = one core: the two stage-2 variants fit the 2-CPU budget together.
    assert steps["stage2_dpn"].cpus == steps["stage2_none"].cpus == steps["stage1"].cpus == 1
    assert steps["stage0_vision"].inputs == [] and "stage0_vision" in steps["stage1"].inputs
    # The LLM's stage 0 needs the corpus tokenizer only: it runs beside preprocessing and the tower's.
    assert steps["stage0_llm"].inputs == ["synth"] and "stage0_llm" in steps["stage1"].inputs
    assert steps["stage0_vision"].cpus == steps["stage0_llm"].cpus == 1
    # A config file's train_overrides are merged with (and may override) the one-worker default.
    two = tiny_pipeline(work_dir=str(tmp_path), train_overrides={"scaling.num_workers": 2, "optim.max_steps": 3})
    assert two.train_overrides == {"scaling.num_workers": 2, "optim.max_steps": 3}
    steps2 = build_pipeline(two).steps
    assert steps2["stage2_dpn"].cpus == 2
    # Stage 0 is keyed by what it trains: other training overrides leave its config (and cache) alone.
    assert steps2["stage0_vision"].config == steps["stage0_vision"].config
    assert steps2["stage0_llm"].config == steps["stage0_llm"].config


def test_stage0_llm_is_keyed_by_its_spec_and_the_corpus_tokenizer(tmp_path):
    from pipelines.workflow import build_pipeline, tiny_pipeline

    def fp(**overrides):
        pipe = build_pipeline(tiny_pipeline(work_dir=str(tmp_path), **overrides))
        return {name: pipe.out_dir(name).name for name in ("synth", "stage0_llm", "stage0_vision")}

    base = fp()
    assert fp() == base  # deterministic
    other_spec = fp(train_overrides={"llm_pretrain.bare_mix": 0.5})
    assert other_spec["stage0_llm"] != base["stage0_llm"] and other_spec["stage0_vision"] == base["stage0_vision"]
    # Another corpus is another tokenizer: the synth step's fingerprint feeds the LLM's, not the tower's.
    other_corpus = fp(corpus={"seed": 1, "n_pretrain": 512, "n_instruct": 9600, "n_eval": 300})
    assert other_corpus["synth"] != base["synth"] and other_corpus["stage0_llm"] != base["stage0_llm"]
    assert other_corpus["stage0_vision"] == base["stage0_vision"]


def test_dpn_train_maps_its_data_and_stages_onto_the_dag(tmp_path):
    from pipelines.workflow import build_pipeline, training_pipeline

    work = f"work_dir={tmp_path}"
    one = training_pipeline("tiny", "1", [work, "data.synth_records=32", "optim.max_steps=2"])
    assert (one.until, one.corpus.synthetic, one.corpus.n_pretrain, one.corpus.n_calibration) == ("stage1", True, 32, 0)
    assert one.train_overrides == {"optim.max_steps": "2"} and one.work_dir == str(tmp_path)
    assert set(build_pipeline(one).steps) == {"synth", "stage0_vision", "stage0_llm", "preprocess_pretrain", "stage1"}
    # Stage 2 alone still needs stage 1 (the recipe starts it from "<stage1>"): the DAG pulls it in.
    two = training_pipeline("tiny", "2", [work, "model.compressor=static"])
    assert two.variants == ["static"] and "model.compressor" not in two.train_overrides
    assert {"stage1", "preprocess_instruct", "stage2_static"} <= set(build_pipeline(two).steps)
    assert "evaluate" not in build_pipeline(two).steps
    # One DAG, one cache: `dpn train` and `dpn pipeline run` share every step whose config agrees (stage 0's).
    from pipelines.workflow import tiny_pipeline

    demo = build_pipeline(tiny_pipeline(work_dir=str(tmp_path)))
    assert build_pipeline(one).out_dir("stage0_vision") == demo.out_dir("stage0_vision")

    # A LLaVA JSON: preprocessed by the DAG; the corpus fields come from data.*.
    from pipelines.data.synth.corpus import generate_corpus

    generate_corpus(tmp_path / "c", n_pretrain=16, n_instruct=16, n_eval=15)
    c = tmp_path / "c"
    real = training_pipeline("tiny", "1", [work, "data.synthetic=false", f"data.annotations={c / 'pretrain.json'}",
                                           f"data.image_root={c / 'images'}", f"data.tokenizer={c / 'tokenizer'}"])
    assert (real.corpus.synthetic, real.corpus.pretrain_annotations) == (False, str(c / "pretrain.json"))
    assert "synth" not in build_pipeline(real).steps and "preprocess_pretrain" in build_pipeline(real).steps
    with pytest.raises(ValueError, match=r"model\.path: '<stage1>' stands for stage 1's output"):
        training_pipeline("tiny", "2", [work, "data.synthetic=false", f"data.annotations={c / 'instruct.json'}",
                                        f"data.image_root={c / 'images'}", f"data.tokenizer={c / 'tokenizer'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.annotations"):
        training_pipeline("tiny", "1", [work, "data.synthetic=false", "data.annotations=/nope.json",
                                        f"data.image_root={c}", f"data.tokenizer={c / 'tokenizer'}"])
    with pytest.raises(ValueError, match=r"optim\.lr"):
        training_pipeline("tiny", "all", [work, "optim.lr=-1"])
