"""Stage training with Ray Train + DeepSpeed on CPU, tracked in MLflow, surviving a killed worker, run as
steps of the pipeline DAG (as `dpn train` runs them).

The slow tests share one Ray session (2 CPUs) and one pair of trained stages (module fixtures): stage 0,
stage 1 then stage 2 of the `tiny` recipe, steps of the DAG up to stage 2, on a small synthetic corpus in
LLaVA layout (given as annotation files, as real corpora are) with 2 workers. A third run of stage 1 has
its rank-0 worker killed by pid mid-run and must finish like the uninterrupted one; `dpn train` on given
shards runs stage 1 through the same DAG, and a second run is all cache hits.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines import registry, tracking
from pipelines.recipes import apply_overrides, config_from_dict, get_recipe
from pipelines.training.driver import PROGRESS_DIR, run_stage
from pipelines.training.model_setup import build_model, check_zero3
from pipelines.training.schedule import deepspeed_config, lr_factor, total_steps
from pipelines.training.worker import AlignedBatches, StepStats

# Global batch 16 = 2 workers x micro-batch 4 x 2 accumulation; 8 optimizer steps per stage (stage 1:
# 32 caption records = 2 steps per epoch, 4 epochs; stage 2: 48 instruction records, a third text-only).
OVERRIDES = [
    "data.micro_batch_size=4", "optim.global_batch_size=16", "optim.max_steps=8",
    "checkpoint.every_n_steps=2", "tracking.system_metrics_interval_s=1",
    "vision_pretrain.steps=3", "vision_pretrain.batch_size=4", "vision_pretrain.eval_images=4",
    "llm_pretrain.steps=3", "llm_pretrain.bare_steps=1", "llm_pretrain.eval_questions=5",
]


# ----- configs (fast) -------------------------------------------------------------------------------
def test_bad_values_fail_naming_the_field():
    with pytest.raises(ValueError, match=r"optim\.lr"):
        get_recipe("tiny", 1, ["optim.lr=-1"])
    with pytest.raises(ValueError, match=r"optim\.lr: expected a number, got 'fast'"):
        get_recipe("tiny", 1, ["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"optim\.lrr: unknown field; optim has fields \[.*'lr'"):
        get_recipe("tiny", 1, ["optim.lrr=1e-3"])
    with pytest.raises(ValueError, match=r"scaling\.zero_stage"):
        get_recipe("tiny", 2, ["scaling.zero_stage=4"])
    with pytest.raises(ValueError, match=r"model\.compressor.*stage 1"):
        get_recipe("tiny", 1, ["model.compressor=dpn"])
    # 32 is not a multiple of micro-batch 8 x 3 workers.
    with pytest.raises(ValueError, match=r"optim\.global_batch_size"):
        get_recipe("tiny", 1, ["scaling.num_workers=3"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("llava-2", 1)


def test_cli_rejects_a_bad_value_before_ray_starts(capsys):
    from jobs.cli import main

    assert main(["train", "--recipe", "tiny", "--set", "data.micro_batch_size=0"]) == 2
    assert "data.micro_batch_size" in capsys.readouterr().err


def test_overrides_are_typed_and_the_global_batch_is_kept():
    cfg = get_recipe("tiny", 2, ["optim.lr=3e-4", "model.train_vision_tower=true", "optim.max_steps=none",
                                 "optim.global_batch_size=32"])
    assert cfg.optim.lr == 3e-4 and cfg.model.train_vision_tower is True and cfg.optim.max_steps is None
    # Global 32, micro 8: 2 workers accumulate 2 micro-batches, 1 worker 4, 4 workers 1.
    for workers, accum in ((1, 4), (2, 2), (4, 1)):
        c = apply_overrides(cfg, [f"scaling.num_workers={workers}"])
        ds = deepspeed_config(c, workers)
        assert c.grad_accum_steps == accum == ds["gradient_accumulation_steps"]
        assert ds["train_batch_size"] == 32 == ds["train_micro_batch_size_per_gpu"] * accum * workers
    # The paper's stage-2 recipe on 8 GPUs: 16 x 8 = 128, no accumulation; ZeRO-3 for 13B.
    assert get_recipe("llava-1.5-7b", 2).grad_accum_steps == 1
    assert get_recipe("llava-1.5-13b", 2).scaling.zero_stage == 3
    assert get_recipe("llava-1.5-7b", 1).optim.lr == 1e-3 and get_recipe("llava-1.5-7b", 1).optim.global_batch_size == 256


def test_run_name_is_deterministic_and_follows_the_config():
    a, b = get_recipe("tiny", 1), get_recipe("tiny", 1)
    assert a.resolved_run_name() == b.resolved_run_name()
    assert apply_overrides(a, ["optim.lr=2e-3"]).resolved_run_name() != a.resolved_run_name()
    # Tracking and the retry budget do not change what is trained: same run, resumable.
    assert apply_overrides(a, ["checkpoint.max_failures=9", "tracking.experiment=x"]).fingerprint() == a.fingerprint()


def test_lr_schedule_and_step_count():
    # 10 steps, warmup ceil(0.2 * 10) = 2: 0.5, 1.0, then cosine over the remaining 8 steps.
    f = [lr_factor(s, 10, 0.2, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[6] == pytest.approx(0.5)  # progress 4/8: (1 + cos(pi/2)) / 2
    assert lr_factor(9, 10, 0.2, "linear") == pytest.approx(1 - 7 / 8)
    cfg = get_recipe("tiny", 1, ["optim.num_epochs=1.5"])
    assert total_steps(cfg, 100) == 5  # ceil(1.5 * 100 / 32)
    assert total_steps(apply_overrides(cfg, ["optim.max_steps=7"]), 100) == 7


def test_step_stats_paths_compression_and_flops():
    from types import SimpleNamespace

    from dpn.flops import llm_prefill_flops
    from dpn.presets import test_tiny

    mc = test_tiny()  # 4 layers, DPE after layers 0/1/2, experts (1,1) (1,2) (2,2)
    st = StepStats(mc)
    vis = torch.tensor([[64, 16, 16, 8], [64, 64, 64, 64], [0, 0, 0, 0]])
    txt = torch.tensor([[10, 10, 10, 10], [12, 12, 12, 12], [7, 7, 7, 7]])
    out = SimpleNamespace(
        num_label_tokens=torch.tensor(4), lm_loss=torch.tensor(2.0), route_loss=torch.tensor(0.5),
        visual_tokens_per_layer=vis, text_tokens_per_layer=txt,
        routing_paths=torch.tensor([[2, 0, 1], [0, 0, -1], [-1, -1, -1]]),
    )
    batch = {"attention_mask": torch.tensor([[1] * 74 + [0] * 2, [1] * 76, [1] * 7 + [0] * 69])}
    st.add(batch, out)
    m = st.reduce("cpu")
    assert m["train/samples"] == 3 and m["train/tokens"] == 74 + 76 + 7
    assert m["loss/lm"] == 2.0 and m["loss/route"] == 0.5
    # The text-only sample made no routing decision: shares over the two routed samples.
    # Paths in the one notation (`dpn.compressors.format_path`): a DPE that did not pool is "n".
    assert m["routing/path_share/4-1-2"] == 0.5 and m["routing/path_share/1-1-n"] == 0.5
    assert m["routing/mean_compression/layer0"] == pytest.approx((4 + 1) / 2)
    assert m["routing/mean_compression/layer2"] == pytest.approx(2.0)  # one sample pooled there
    tc = mc.text_config
    ours = sum(llm_prefill_flops(tc, (v + t).tolist()) for v, t in zip(vis, txt, strict=True))
    base = sum(llm_prefill_flops(tc, [int(v[0] + t[0])] * 4) for v, t in zip(vis, txt, strict=True))
    assert m["flops/prefill_tflops_per_sample"] == pytest.approx(ours / 3 / 1e12)
    assert m["flops/saving"] == pytest.approx(1 - ours / base)
    assert 0 < m["flops/saving"] < 1


def test_zero3_is_refused_where_a_router_could_be_skipped():
    from dpn.presets import llava_1_5_13b, tiny

    z3 = get_recipe("tiny", 2, ["scaling.zero_stage=3"])
    # tiny: 144 tokens -> 36 -> 9 < 16 at the third DPE: a sample may skip that router.
    with pytest.raises(ValueError, match=r"scaling\.zero_stage: 3 .* DPE 2 \(layer 2\) with 9"):
        check_zero3(z3, tiny(compressor="dpn"))
    check_zero3(z3, llava_1_5_13b(compressor="dpn"))  # 576 -> 144 -> 36: every router always runs
    check_zero3(z3, tiny(compressor="static"))  # no router
    with pytest.raises(ValueError, match="conv"):
        check_zero3(z3, tiny(compressor="dpn", pool="conv"))
    check_zero3(get_recipe("tiny", 2), tiny(compressor="dpn"))  # ZeRO-2: fine


def test_aligned_batches_prefer_text_and_bound_the_lookahead():
    img = [{"input_ids": torch.tensor([[i]]), "pixel_values": torch.zeros(1)} for i in range(6)]
    txt = [{"input_ids": torch.tensor([[100 + i]])} for i in range(2)]
    stream = [img[0], img[1], txt[0], img[2], img[3], img[4], img[5], txt[1]]
    pulled = []

    def source():
        for b in stream:
            pulled.append(b)
            yield b

    ab = AlignedBatches(source(), "cpu", lookahead=3)
    first = ab.next()
    assert first is txt[0] and len(pulled) == 3  # looked ahead past two image batches to a text one
    got = [ab.next() for _ in range(7)]
    # At most 3 batches are held: the second text batch is seen only once images 0-3 are out (each pop
    # lets one more batch in), then it goes first.
    assert [int(b["input_ids"]) for b in got if b is not None] == [0, 1, 2, 3, 101, 4, 5]
    assert ab.next() is None


# ----- tracking (fast) ------------------------------------------------------------------------------
def test_tracking_resume_by_key_params_metrics_registry(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(work_dir=tmp_path)
    assert uri == f"sqlite:///{tmp_path.absolute() / 'mlflow.db'}"
    parent = tracking.RunTracker.open(work_dir=tmp_path, run_name="parent")
    run = tracking.RunTracker.open(work_dir=tmp_path, run_key="k", parent_run_id=parent.run_id)
    assert not run.resumed
    run.log_params({"optim": {"lr": 1e-3}, "stage": 1})
    run.log_metrics({"loss/lm": 2.0}, step=1)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run.log_model_dir(model_dir)
    run.log_dataset({"fingerprint": "abc123", "rows": 3}, name="shards", source=str(tmp_path))
    again = tracking.RunTracker.open(work_dir=tmp_path, run_key="k", parent_run_id=parent.run_id)
    assert again.resumed and again.run_id == run.run_id
    again.log_params({"optim": {"lr": 1e-3}})  # same value: fine
    with pytest.raises(ValueError, match="optim.lr"):
        again.log_params({"optim": {"lr": 2e-3}})
    again.log_metrics({"loss/lm": 1.0, "skipped": float("nan")}, step=2)
    again.finish()
    info = tracking.get_run(run.run_id, uri)
    assert info["status"] == "FINISHED" and info["parent_run_id"] == parent.run_id
    assert info["params"]["optim.lr"] == "0.001" and "skipped" not in info["metrics"]
    assert tracking.metric_history(run.run_id, "loss/lm", uri) == [(1, 2.0), (2, 1.0)]
    assert [r["run_id"] for r in tracking.child_runs(parent.run_id, uri)] == [run.run_id]
    inputs = tracking.client(uri).get_run(run.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("shards", "abc123")]
    assert (tmp_path / "mlartifacts").is_dir()  # explicit artifact root under the work dir, not ./mlruns
    v = tracking.register_model(run.run_id, "dpn-test", tracking_uri=uri)
    tracking.set_alias("dpn-test", registry.CHAMPION, v, uri)
    assert tracking.get_alias("dpn-test", registry.CHAMPION, uri)["run_id"] == run.run_id
    assert tracking.get_alias("dpn-test", registry.CHALLENGER, uri) is None
    got = tracking.download_model("dpn-test", alias=registry.CHAMPION, dst_dir=tmp_path / "dl", tracking_uri=uri)
    assert (got / "config.json").read_text() == "{}"
    exp_id = tracking.client(uri).get_run(run.run_id).info.experiment_id
    assert tracking.run_link(run.run_id, uri) == (f"mlflow ui --backend-store-uri {uri}   then open "
                                                  f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run.run_id}")
    assert tracking.client(uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    inert = tracking.RunTracker.open(work_dir=tmp_path, enabled=False)  # ranks != 0
    inert.log_metrics({"x": 1.0}, step=1)
    assert inert.run_id is None


# ----- Ray Train + DeepSpeed (slow) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():  # another module's session: start ours with exactly 2 CPUs
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _wait_cpus_free(ray, timeout=60.0):
    # A failed controller can leak the workers' CPU reservation and hang the next test: check it does not.
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= 2:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ray CPUs not released: {ray.available_resources()}")


@pytest.fixture(scope="module")
def work(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("train")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def corpus(work):
    from pipelines.data.synth.corpus import SynthConfig, write_corpus

    # More text-only records than the default 10%, so that stage 2 sees text-only micro-batches.
    out = work / "corpus"
    write_corpus(out, SynthConfig(n_pretrain=32, n_instruct=48, n_eval=15, text_only_fraction=0.35))
    return out


def _stage(result, name: str) -> SimpleNamespace:
    """A stage step's outputs, paths absolute, and the config it trained."""
    out = result.outputs
    return SimpleNamespace(name=name, run_id=out["train_run_id"], steps=out["steps"], status=out["status"],
                           model_dir=str(result.out_dir / out["model_dir"]), config=config_from_dict(out["config"]))


@pytest.fixture(scope="module")
def stages(ray_session, work, corpus):
    from pipelines.data.sources import CorpusConfig
    from pipelines.workflow import PipelineConfig, execute

    cfg = PipelineConfig(
        name="test-train", work_dir=str(work), train_recipe="tiny", variants=["dpn"], until="stage2",
        corpus=CorpusConfig(synthetic=False, pretrain_annotations=str(corpus / "pretrain.json"),
                            instruct_annotations=str(corpus / "instruct.json"), image_root=str(corpus / "images"),
                            tokenizer=str(corpus / "tokenizer")),
        train_overrides=dict(item.split("=", 1) for item in OVERRIDES),
    )
    status, parent, results = execute(cfg)
    _wait_cpus_free(ray_session)
    assert status == "succeeded", {n: r.error for n, r in results.items()}
    r1, r2 = _stage(results["stage1"], "stage1"), _stage(results["stage2_dpn"], "stage2_dpn")
    return {"pipeline": cfg, "results": results, "cfg1": r1.config, "r1": r1, "cfg2": r2.config, "r2": r2,
            "uri": tracking.resolve_tracking_uri(work_dir=work)}


def _tokenizer(result):
    from dpn.tokenizer import load_tokenizer

    return load_tokenizer(result.model_dir)


def _load(model_dir):
    from dpn.modeling_dpn import DPNForConditionalGeneration

    return DPNForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)


def _changed(a: dict, b: dict, prefix: str) -> tuple[int, int]:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return sum(not torch.equal(a[k], b[k]) for k in keys), len(keys)


@pytest.mark.slow
def test_both_stages_train_to_the_planned_step_count(stages):
    r1, r2 = stages["r1"], stages["r2"]
    assert (r1.steps, r2.steps) == (8, 8) and r1.status == r2.status == "trained"
    # The stages read the DAG's shards and stage 0's tower / LLM; stage 2 starts from stage 1's model.
    assert stages["cfg1"].data.shards.startswith(str(stages["results"]["preprocess_pretrain"].out_dir))
    assert stages["cfg1"].model.vision_path == str(stages["results"]["stage0_vision"].out_dir / "vision_tower")
    assert stages["cfg2"].model.path == r1.model_dir and stages["cfg2"].data.add_router_token
    # Stage 2 trained text-only micro-batches too (modality aligned across the two ranks), stage 1 none.
    share = dict(tracking.metric_history(r2.run_id, "data/image_share", stages["uri"]))
    assert min(share.values()) < 1.0 and max(share.values()) > 0.0
    assert {v for _, v in tracking.metric_history(r1.run_id, "data/image_share", stages["uri"])} == {1.0}


@pytest.mark.slow
def test_loss_goes_down(stages):
    for r in (stages["r1"], stages["r2"]):
        hist = tracking.metric_history(r.run_id, "loss/lm", stages["uri"])
        assert [s for s, _ in hist] == list(range(1, 9))
        first, last = hist[0][1], sum(v for _, v in hist[-2:]) / 2
        assert last < first - 0.1, (r.stage, hist)


@pytest.mark.slow
def test_stage1_trains_only_the_projector(stages):
    from dataclasses import replace

    from transformers import CLIPVisionModel

    initial = build_model(stages["cfg1"], _tokenizer(stages["r1"])).state_dict()
    trained = _load(stages["r1"].model_dir).state_dict()
    assert set(initial) == set(trained)
    assert _changed(initial, trained, "multi_modal_projector.") == (4, 4)
    assert _changed(initial, trained, "vision_tower.")[0] == 0
    assert _changed(initial, trained, "language_model.")[0] == 0
    # The vision tower is stage 0's (the recipe's "<stage0>" resolved to its output), not the random one.
    stage0 = CLIPVisionModel.from_pretrained(stages["cfg1"].model.vision_path, local_files_only=True).state_dict()
    assert all(torch.equal(trained[f"vision_tower.{k}"], v) for k, v in stage0.items())
    random_tower = build_model(replace(stages["cfg1"], model=replace(stages["cfg1"].model, vision_path=None)),
                               _tokenizer(stages["r1"])).state_dict()
    n, total = _changed(random_tower, trained, "vision_tower.")
    assert n > total // 2
    # So is the LLM (stage 0's, `pipelines.training.stage0.llm`), with the stage's vocabulary.
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(stages["cfg1"].model.llm_path, local_files_only=True).state_dict()
    assert all(torch.equal(trained[f"language_model.{k}"], v) for k, v in llm.items())


@pytest.mark.slow
def test_stage2_trains_llm_projector_and_fresh_routers(stages):
    before = _load(stages["r1"].model_dir).state_dict()
    fresh = build_model(stages["cfg2"], _tokenizer(stages["r2"])).state_dict()  # stage 1 + fresh routers
    after = _load(stages["r2"].model_dir).state_dict()
    assert not any(k.startswith("routers.") for k in before)
    assert _changed(before, after, "vision_tower.")[0] == 0  # model.train_vision_tower is false
    assert _changed(before, after, "multi_modal_projector.") == (4, 4)
    from dpn.presets import tiny

    for i in range(tiny().text_config.num_hidden_layers):  # every decoder layer's attention projections moved
        assert _changed(before, after, f"language_model.model.layers.{i}.self_attn.")[0] == 4
    params = [k for k in fresh if k.startswith("routers.") and not k.endswith(("input_shift", "input_scale"))]
    changed = [k for k in params if not torch.equal(fresh[k], after[k])]
    assert len(params) == 12 and len(changed) >= 9  # 3 routers x (norm w/b, fc1, fc2); each routed DPE got gradients
    # The input standardisation is a buffer set by route calibration only (`dpn.routing.fit_routers`).
    assert _changed(fresh, after, "routers.")[0] == len(changed)


@pytest.mark.slow
def test_stage2_model_from_mlflow_loads_and_generates(stages, tmp_path):
    from PIL import Image

    from dpn.conversation import encode_prompt
    from dpn.image_processing import build_image_processor, preprocess_images

    r2 = stages["r2"]
    model_dir = tracking.download_artifacts(r2.run_id, "model", tmp_path, stages["uri"])
    model = _load(model_dir).eval()
    tok = _tokenizer(r2)
    cfg = model.config
    assert cfg.compressor == "dpn" and cfg.router_token_id == tok.convert_tokens_to_ids("<ROUTER>")
    ids = encode_prompt("What color is the circle?", tok, "vicuna_v1", cfg.num_image_tokens, has_image=True,
                        add_router_token=True)
    image = Image.new("RGB", (64, 64), (220, 36, 36))
    pixels = preprocess_images([image], build_image_processor(cfg.vision_config.image_size))
    out = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=5, return_dict_in_generate=True)
    assert out.new_tokens.shape[0] == 1 and 1 <= out.new_tokens.shape[1] <= 5
    assert int(out.routing_paths[0, 0]) >= 0  # the image was routed at the first DPE
    n_img = cfg.num_image_tokens
    assert int(out.visual_tokens_per_layer[0, 0]) == n_img


@pytest.mark.slow
def test_mlflow_holds_params_metrics_dataset_and_artifacts(stages):
    uri = stages["uri"]
    c = tracking.client(uri)
    for r, cfg in ((stages["r1"], stages["cfg1"]), (stages["r2"], stages["cfg2"])):
        info = tracking.get_run(r.run_id, uri)
        assert info["status"] == "FINISHED" and info["run_name"] == r.name  # the DAG step's run
        assert info["params"]["optim.lr"] == str(cfg.optim.lr) and info["params"]["derived.total_steps"] == "8"
        keys = set(info["metrics"])
        for k in ("loss/lm", "lr", "throughput/samples_per_s", "throughput/tokens_per_s",
                  "flops/prefill_tflops_per_sample", "flops/saving", "optim/grad_norm",
                  "system/cpu_utilization_percentage"):
            assert k in keys, (r.stage, k)
        artifacts = {a.path for a in c.list_artifacts(r.run_id, "model")}
        assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts
        assert [a.path for a in c.list_artifacts(r.run_id, "projector")] == ["projector/multi_modal_projector.safetensors"]
        inputs = c.get_run(r.run_id).inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].tags[0].value == "training"
    m2 = tracking.get_run(stages["r2"].run_id, uri)["metrics"]
    assert "loss/route" in m2 and "routing/mean_compression/layer1" in m2
    assert any(k.startswith("routing/path_share/") for k in m2)
    assert m2["flops/saving"] > 0.1  # DPN pools: deeper layers see fewer tokens
    assert tracking.get_run(stages["r1"].run_id, uri)["metrics"]["flops/saving"] == 0.0  # stage 1: plain LLaVA


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_step_count_in_one_mlflow_run(stages, ray_session, work):
    cfg = apply_overrides(stages["cfg1"], ["run_name=kill-test"])
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", run_stage(cfg)), daemon=True)
    thread.start()
    progress = work / "ray" / "kill-test" / PROGRESS_DIR / "rank0.json"
    # A reported checkpoint becomes durable only when the Train controller registers it, at its next
    # poll of the workers (every 2 s): a worker killed before that loses it, and the run restarts from
    # the previous one. Kill only once the controller's snapshot names a registered checkpoint.
    snapshot = work / "ray" / "kill-test" / "checkpoint_manager_snapshot.json"
    killed = registered = None
    deadline = time.time() + 400
    while thread.is_alive() and time.time() < deadline:
        if killed is None and progress.is_file() and snapshot.is_file():
            try:
                p = json.loads(progress.read_text())
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            except ValueError:  # replaced while we read it
                p, latest = {}, {}
            # After a registered checkpoint, before the end (8 steps).
            if latest and p.get("step", 0) < 8 and p.get("resumed_from") is None:
                registered = int(latest["checkpoint_dir_name"].removeprefix("step"))
                os.kill(p["pid"], signal.SIGKILL)
                killed = p
        time.sleep(0.05)
    thread.join(timeout=max(1.0, deadline - time.time()))
    assert killed is not None, "the run ended before a worker could be killed mid-run"
    result = box["result"]
    assert result.steps == stages["r1"].steps == 8
    final = json.loads(progress.read_text())
    resumed = final["resumed_from"]
    assert final["pid"] != killed["pid"] and final["step"] == 8
    # The last checkpoint registered before the kill (or a later one reported and registered meanwhile).
    assert resumed in (2, 4, 6) and registered <= resumed <= killed["step"], (registered, resumed, killed)
    runs = tracking.find_runs("dpn", "tags.`dpn.run_key` = 'kill-test'", stages["uri"])
    assert len(runs) == 1 and runs[0]["run_id"] == result.run_id and runs[0]["status"] == "FINISHED"
    assert tracking.metric_history(result.run_id, "train/resumed_from_step", stages["uri"]) == [(resumed, float(resumed))]
    steps = {s for s, _ in tracking.metric_history(result.run_id, "loss/lm", stages["uri"])}
    assert steps == set(range(1, 9))
    assert Path(result.model_dir, "model.safetensors").is_file()
    # Every checkpoint carries the ranks' checksum manifests (the resume above verified one before loading).
    from pipelines.publish import verify_checksums

    checkpoints = sorted((work / "ray" / "kill-test").glob("*step*"))
    assert checkpoints and all(verify_checksums(c) > 0 for c in checkpoints), checkpoints
    _wait_cpus_free(ray_session)


@pytest.mark.slow
def test_dpn_train_runs_stage1_through_the_dag_on_given_shards_then_all_cached(stages, work, corpus, capsys):
    from jobs.cli import main

    shards = stages["cfg1"].data.shards
    argv = ["train", "--recipe", "tiny", "--stage", "1", "--set", f"work_dir={work}", "--set", "data.synthetic=false",
            "--set", f"data.shards={shards}", "--set", f"data.tokenizer={corpus / 'tokenizer'}",
            *[a for item in OVERRIDES for a in ("--set", item)]]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    steps = {s["name"]: s["status"] for s in first["steps"]}
    # Stage 0 is the fixture's (same spec, same tokenizer): one cache for every command.
    assert steps == {"stage0_vision": "cached", "stage0_llm": "cached", "preprocess_pretrain": "ran", "stage1": "ran"}
    (stage1,) = first["stages"]
    assert stage1["steps"] == 8 and Path(stage1["model_dir"], "processor_config.json").is_file()
    assert stage1["status"] == "trained" and first["recipe"] == "tiny"
    assert main(argv) == 0  # `dpn train` shut its Ray down at the end: this run starts its own
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {s["status"] for s in again["steps"]} == {"cached"}
    assert again["stages"][0]["model_dir"] == stage1["model_dir"]


def test_deepspeed_never_waits_on_a_stale_extension_lock(tmp_path, monkeypatch):
    # A worker killed while DeepSpeed JIT-loaded its shared-memory comm op leaves this lock behind; a
    # later DeepSpeed start that loaded the op would wait on it forever.
    import threading

    from deepspeed.comm.torch import build_shm_op

    from pipelines.training.worker import _skip_shm_comm_op

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _skip_shm_comm_op()
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("op", build_shm_op()), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "build_shm_op is waiting on the stale lock"
    assert box["op"] is None and lock.exists()
