"""The evaluation fan-out (pipelines/evaluation/) on a tiny random model and a small synthetic benchmark:
fan-out vs one worker, retry of a failing shard, resume from finished shards, MLflow child runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dpn import inference
from dpn.eval.scoring import EvalDataError, load_jsonl, score_files
from dpn.flops import llm_prefill_flops
from pipelines.evaluation import benchmarks, config, fanout, report, run

SHARD_SIZE = 4  # -> 4 shards per (model, compressor); a multiple of BATCH_SIZE
BATCH_SIZE = 2


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(assets, out: Path, **overrides) -> config.EvalConfig:
    kw = dict(
        targets=[config.EvalTarget(name="tiny", model_dir=str(assets["model"]), compressors=["dpn", "none"])],
        benchmarks=["synthetic"], data_root=str(assets["data_root"]), out_dir=str(out),
        batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, max_new_tokens=3,
    )
    kw.update(overrides)
    return config.EvalConfig(**kw)


def _read(path) -> list[dict]:
    return load_jsonl(path)


# ----- pure functions --------------------------------------------------------------------------------
def test_aggregate_hand_computed():
    def rec(path, tflops, base, difficulty):
        return {"metadata": {"routing_path": path, "prefill_tflops": tflops, "prefill_tflops_exact": 2 * tflops,
                             "baseline_prefill_tflops": base, "vision_tflops": 0.5, "difficulty": difficulty}}

    agg = report.aggregate([rec("4-2-1", 1.0, 4.0, "easy"), rec("4-2-1", 2.0, 4.0, "easy"),
                        rec("1-1-1", 4.0, 4.0, "hard"), rec("2-2-2", 3.0, 4.0, "hard")])
    assert agg["num_samples"] == 4
    assert agg["prefill_tflops_per_sample"] == pytest.approx(2.5)
    assert agg["prefill_tflops_exact_per_sample"] == pytest.approx(5.0)
    assert agg["baseline_prefill_tflops_per_sample"] == pytest.approx(4.0)
    assert agg["path_shares"] == {"1-1-1": 25.0, "2-2-2": 25.0, "4-2-1": 50.0}
    assert agg["path_shares_by_difficulty"] == {"easy": {"4-2-1": 100.0}, "hard": {"1-1-1": 50.0, "2-2-2": 50.0}}


def test_pareto_front():
    # (TFLOPs, accuracy): (2, 60) is dominated by (1, 70); the front runs from cheapest to most accurate.
    assert report._pareto_front([(3.0, 80.0), (1.0, 70.0), (2.0, 60.0), (4.0, 79.0)]) == [(1.0, 70.0), (3.0, 80.0)]


def test_config_validation_names_bad_values():
    with pytest.raises(ValueError, match="unknown benchmark.*'nope'"):
        config.EvalConfig(targets=[config.EvalTarget(name="m", model_dir="x")], benchmarks=["nope"], data_root=".", out_dir=".")
    with pytest.raises(ValueError, match="unknown compressor.*'fast'"):
        config.EvalTarget(name="m", model_dir="x", compressors=["fast"])
    with pytest.raises(ValueError, match="target name"):
        config.EvalTarget(name="a/b", model_dir="x")


def test_load_benchmark_limit_and_missing_ground_truth(assets, tmp_path):
    data = benchmarks.load_benchmark("synthetic", assets["data_root"], limit=5)
    assert [it.question_id for it in data.items] == [0, 1, 2, 3, 4]
    assert sorted(r["question_id"] for r in data.ground_truth) == [0, 1, 2, 3, 4]
    assert data.items[0].extra["difficulty"] in ("easy", "medium", "hard")

    broken = tmp_path / "eval"
    shutil.copytree(assets["data_root"], broken)
    gt = broken / "synthetic" / "ground_truth.jsonl"
    rows = [r for r in _read(gt) if r["question_id"] != 3]
    gt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalDataError, match=r"no ground truth.*\[3\]"):
        benchmarks.load_benchmark("synthetic", broken)


def test_shard_fingerprint_tracks_inputs(assets, tmp_path):
    cfg = _config(assets, tmp_path)
    data = {"synthetic": benchmarks.load_benchmark("synthetic", cfg.data_root)}
    comps = {"tiny": ["dpn", "none"]}
    tasks = fanout.plan_shards(cfg, data, comps, "code-1", "float32")
    assert [t.key for t in tasks[:5]] == [f"tiny/dpn/synthetic/{i}" for i in range(4)] + ["tiny/none/synthetic/0"]
    assert [len(t.items) for t in tasks[:4]] == [4, 4, 4, 3]
    same = fanout.plan_shards(_config(assets, tmp_path), data, comps, "code-1", "float32")
    assert [t.fingerprint for t in same] == [t.fingerprint for t in tasks]
    for changed in (fanout.plan_shards(_config(assets, tmp_path, max_new_tokens=5), data, comps, "code-1", "float32"),
                    fanout.plan_shards(cfg, data, comps, "code-2", "float32"),
                    fanout.plan_shards(cfg, data, comps, "code-1", "bfloat16")):
        assert all(a.fingerprint != b.fingerprint for a, b in zip(changed, tasks, strict=True))


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite `path` with `data` (same size) and set its mtime back: what size+mtime cannot see."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def test_file_identity_is_the_content_hash(tmp_path):
    import hashlib

    data = os.urandom(5 * 2**20 + 7)  # above the 4 MiB under which files used to be hashed at all
    src = tmp_path / "a" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(data)
    (tmp_path / "a" / "config.json").write_text("{}")
    assert fanout._file_identity(src) == hashlib.sha256(data).hexdigest()

    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy, copy_function=shutil.copy)  # new files, new mtimes
    assert fanout._dir_identity(copy) == fanout._dir_identity(tmp_path / "a")

    changed = bytearray(data)
    changed[-1] ^= 0xFF
    _rewrite_in_place(copy / "model.safetensors", bytes(changed))
    assert fanout._file_identity(copy / "model.safetensors") == hashlib.sha256(changed).hexdigest()
    assert fanout._dir_identity(copy) != fanout._dir_identity(tmp_path / "a")


def test_file_identity_hashes_a_file_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = fanout._sha256_file
    monkeypatch.setattr(fanout, "_CONTENT_HASHES", {})
    monkeypatch.setattr(fanout, "_sha256_file", lambda p: calls.append(p) or real(p))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 1000)
    first = fanout._file_identity(weights)
    assert fanout._file_identity(weights) == first and len(calls) == 1
    # A rewrite in place with the mtime set back still moves ctime: hashed again, new identity.
    _rewrite_in_place(weights, b"y" * 1000)
    assert fanout._file_identity(weights) != first and len(calls) == 2


def test_copied_checkpoint_reuses_shards_changed_weights_do_not(assets, tmp_path):
    data = {"synthetic": benchmarks.load_benchmark("synthetic", assets["data_root"])}
    comps = {"tiny": ["dpn"]}

    def plan(model_dir: Path) -> list[fanout.ShardTask]:
        target = [config.EvalTarget(name="tiny", model_dir=str(model_dir), compressors=["dpn"])]
        return fanout.plan_shards(_config(assets, tmp_path, targets=target), data, comps, "code-1", "float32")

    # The tiny checkpoint plus a shard of weights the size of real ones (over 4 MiB: once fingerprinted
    # by size and mtime only).
    original = tmp_path / "model"
    shutil.copytree(assets["model"], original)
    (original / "model-00002-of-00002.safetensors").write_bytes(os.urandom(5 * 2**20))
    copy = tmp_path / "copied-model"
    shutil.copytree(original, copy, copy_function=shutil.copy)  # new files, new mtimes
    # Same fingerprints, so the same shard files: a run on the copy finds them finished.
    assert [t.path for t in plan(copy)] == [t.path for t in plan(original)]

    for name in ("model.safetensors", "model-00002-of-00002.safetensors"):
        weights = copy / name
        before = plan(copy)
        changed = bytearray(weights.read_bytes())
        changed[-1] ^= 0xFF  # a weight byte, same size, mtime set back
        _rewrite_in_place(weights, bytes(changed))
        assert all(a.fingerprint != b.fingerprint for a, b in zip(plan(copy), before, strict=True))


# ----- the fan-out on Ray ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fanned_out(ray_cluster, assets):
    """2 CPU workers, one shard failing on its first attempt, tracked in a SQLite MLflow store."""
    out = assets["root"] / "out-2w"
    cfg = _config(assets, out, num_workers=2, inject_failures={"tiny/dpn/synthetic/1": 1})
    uri = f"sqlite:///{assets['root'] / 'mlflow.db'}"
    tracking = run.TrackingOptions(tracking_uri=uri, work_dir=str(assets["root"]), experiment="eval-test")
    summary = run.run_evaluation(cfg, tracking=tracking, log=lambda m: None)
    return {"summary": summary, "out": out, "uri": uri}


@pytest.mark.slow
def test_failed_shard_is_retried(fanned_out):
    shards = fanned_out["summary"]["shards"]
    assert fanned_out["summary"]["status"] == "succeeded"
    assert shards["retried"] == {"tiny/dpn/synthetic/1": 2}
    assert shards["failed"] == {}
    assert (shards["total"], shards["computed"], shards["reused"]) == (8, 8, 0)


@pytest.mark.slow
def test_outputs_and_metrics(fanned_out, assets):
    summary, out = fanned_out["summary"], fanned_out["out"]
    rows = {r["compressor"]: r for r in summary["rows"]}
    assert set(rows) == {"dpn", "none"}
    gt = assets["data_root"] / "synthetic" / "ground_truth.jsonl"
    questions = _read(assets["data_root"] / "synthetic" / "questions.jsonl")
    for comp, row in rows.items():
        pred_file = out / "tiny" / comp / "synthetic" / "predictions.jsonl"
        preds = _read(pred_file)
        # LLaVA answer format, question order, every question once.
        assert [p["question_id"] for p in preds] == [q["question_id"] for q in questions]
        assert set(preds[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert [p["metadata"]["difficulty"] for p in preds] == [q["difficulty"] for q in questions]
        assert row["metrics"]["synthetic"] == score_files("synthetic", pred_file, gt)
        assert row["accuracy"]["synthetic"] == row["metrics"]["synthetic"]["accuracy"]
        assert row["accuracy_by_difficulty"]["synthetic"] == row["metrics"]["synthetic"]["per_difficulty"]
        metrics_json = json.loads((out / "tiny" / comp / "synthetic" / "metrics.json").read_text())
        assert metrics_json["metrics"] == row["metrics"]["synthetic"]
        # Per-sample TFLOPs are the FastV-convention prefill FLOPs of the sample's own token counts.
        from dpn.presets import test_tiny

        text_cfg = test_tiny().text_config
        for p in preds:
            m = p["metadata"]
            n = [v + t for v, t in zip(m["visual_tokens_per_layer"], m["text_tokens_per_layer"], strict=True)]
            assert m["prefill_tflops"] == pytest.approx(llm_prefill_flops(text_cfg, n) / 1e12)
        mean = sum(p["metadata"]["prefill_tflops"] for p in preds) / len(preds)
        assert row["prefill_tflops_per_sample"] == pytest.approx(mean)
        for shares in [row["path_shares"]["synthetic"], *row["path_shares_by_difficulty"]["synthetic"].values()]:
            assert sum(shares.values()) == pytest.approx(100.0)
    # `none` never pools: 64 visual tokens at every layer, one path, no saving vs the uncompressed input.
    assert rows["none"]["path_shares"]["synthetic"] == {"n-n-n": 100.0}
    assert rows["none"]["saving_vs_uncompressed_pct"] == pytest.approx(0.0)
    assert rows["none"]["saving_vs_none_pct"] == pytest.approx(0.0)
    # dpn pools at the first DPE (64 -> <= 32 tokens) on every sample, so it must be cheaper than none.
    assert all(not p.startswith("n") for p in rows["dpn"]["path_shares"]["synthetic"])
    expected = 100 * (1 - rows["dpn"]["prefill_tflops_per_sample"] / rows["none"]["prefill_tflops_per_sample"])
    assert rows["dpn"]["saving_vs_none_pct"] == pytest.approx(expected)
    assert expected > 0
    for fig in summary["figures"].values():
        assert Path(fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny" in report.format_table(summary) and "acc/hard" in report.format_table(summary)
    chance = {"color": 16.67, "shape": 25.0, "count": 25.0, "position": 50.0, "existence": 50.0}
    table = report.format_category_table(summary, chance).splitlines()
    assert table[0].split() == ["per", "question", "type", *chance]
    assert table[1].split() == ["chance", "16.67", "25.00", "25.00", "50.00", "50.00"]
    for line, row in zip(table[2:], summary["rows"], strict=True):
        per = row["metrics"]["synthetic"]["per_category"]
        assert line.split() == [f"{row['model']}/{row['compressor']}", *[f"{per[c]:.2f}" for c in chance]]
    # With difficulties: each model's line, then one line per difficulty from the category x difficulty cells.
    table = report.format_category_table(summary, chance, difficulties=("easy", "hard")).splitlines()
    assert len(table) == 2 + 3 * len(summary["rows"])
    for i, row in enumerate(summary["rows"]):
        cells = row["metrics"]["synthetic"]["per_category_difficulty"]
        assert cells and set(cells) <= {f"{c}/{d}" for c in chance for d in ("easy", "medium", "hard")}
        for j, d in enumerate(("easy", "hard")):
            line = table[2 + 3 * i + 1 + j]
            assert line.startswith(f"  {d}")
            assert line.split()[1:] == [f"{cells[f'{c}/{d}']:.2f}" if f"{c}/{d}" in cells else "-" for c in chance]


@pytest.mark.slow
def test_mlflow_child_runs_hold_metrics_and_artifacts(fanned_out):
    from pipelines.tracking import child_runs, client, get_run

    summary, uri = fanned_out["summary"], fanned_out["uri"]
    parent_id = summary["mlflow"]["parent_run_id"]
    children = {c["run_name"]: c for c in child_runs(parent_id, tracking_uri=uri)}
    assert set(children) == {"tiny/dpn", "tiny/none"}
    c = client(uri)
    for row in summary["rows"]:
        run = get_run(row["mlflow_run_id"], tracking_uri=uri)
        assert run["parent_run_id"] == parent_id and run["status"] == "FINISHED"
        metrics = run["metrics"]
        assert metrics["eval/synthetic/accuracy"] == pytest.approx(row["accuracy"]["synthetic"])
        for d, acc in row["accuracy_by_difficulty"]["synthetic"].items():
            assert metrics[f"eval/synthetic/per_difficulty/{d}"] == pytest.approx(acc)
        assert metrics["flops/prefill_tflops_per_sample"] == pytest.approx(row["prefill_tflops_per_sample"])
        assert metrics["flops/synthetic/prefill_tflops_per_sample"] == pytest.approx(row["prefill_tflops_per_sample"])
        for d, shares in row["path_shares_by_difficulty"]["synthetic"].items():
            for label, share in shares.items():
                assert metrics[f"routing/synthetic/{d}/share_pct/{label}"] == pytest.approx(share)
        assert run["params"]["compressor"] == row["compressor"]
        files = {a.path for top in ("predictions/synthetic", "tables", "figures")
                 for a in c.list_artifacts(row["mlflow_run_id"], top)}
        assert {"predictions/synthetic/predictions.jsonl", "tables/predictions.json",
                "figures/accuracy_vs_flops.png", "figures/routing_by_difficulty.png"} <= files
        # Created when the evaluation started and updated as each of its 4 shards finished.
        from pipelines.tracking import metric_history

        assert [v for _, v in metric_history(row["mlflow_run_id"], "eval/shards_done", uri)] == [1, 2, 3, 4]
    parent_files = {a.path for a in c.list_artifacts(parent_id, "figures")}
    assert "figures/accuracy_vs_flops.png" in parent_files
    # The experiment opens in MLflow 3's classic (model training) view.
    exp = c.get_experiment_by_name("eval-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_one_worker_gives_the_same_results(fanned_out, assets, ray_cluster):
    out = assets["root"] / "out-1w"
    summary = run.run_evaluation(_config(assets, out, num_workers=1), log=lambda m: None)
    assert summary["shards"]["computed"] == 8
    two = {(r["model"], r["compressor"]): r for r in fanned_out["summary"]["rows"]}
    for row in summary["rows"]:
        other = two[(row["model"], row["compressor"])]
        assert row["metrics"] == other["metrics"]
        assert row["prefill_tflops_per_sample"] == other["prefill_tflops_per_sample"]
        assert row["path_shares_by_difficulty"] == other["path_shares_by_difficulty"]
        mine = (out / "tiny" / row["compressor"] / "synthetic" / "predictions.jsonl").read_bytes()
        theirs = (fanned_out["out"] / "tiny" / row["compressor"] / "synthetic" / "predictions.jsonl").read_bytes()
        assert mine == theirs
    # The answers are not all alike, so a reordering of questions or batches would have shown above.
    texts = {p["text"] for p in _read(out / "tiny" / "dpn" / "synthetic" / "predictions.jsonl")}
    assert len(texts) > 1


@pytest.mark.slow
def test_persistent_failure_is_reported_then_resumed(fanned_out, assets, ray_cluster):
    out = assets["root"] / "out-fail"
    bad = "tiny/none/synthetic/2"
    cfg = _config(assets, out, num_workers=2, max_attempts=2, inject_failures={bad: 2})
    with pytest.raises(run.EvalShardsFailed, match=bad) as info:
        run.run_evaluation(cfg, log=lambda m: None)
    summary = info.value.summary
    assert list(summary["shards"]["failed"]) == [bad]
    assert "InjectedShardFailure" in summary["shards"]["failed"][bad]
    assert summary["shards"]["computed"] == 7
    # Nothing is scored from the incomplete benchmark; the complete pair is.
    assert [r["compressor"] for r in summary["rows"]] == ["dpn"]
    assert not (out / "tiny" / "none" / "synthetic" / "predictions.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    resumed = run.run_evaluation(_config(assets, out, num_workers=1), log=lambda m: None)
    assert resumed["status"] == "succeeded"
    assert (resumed["shards"]["computed"], resumed["shards"]["reused"]) == (1, 7)
    ref = assets["root"] / "out-2w" / "tiny" / "none" / "synthetic" / "predictions.jsonl"
    assert (out / "tiny" / "none" / "synthetic" / "predictions.jsonl").read_bytes() == ref.read_bytes()


# ----- the CLI ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_eval_run(assets, ray_cluster, capsys):
    from jobs.cli import main

    out = assets["root"] / "out-cli"
    rc = main(["eval", "run", "--model", str(assets["model"]), "--benchmarks", "synthetic",
               "--data-root", str(assets["data_root"]), "--compressors", "static", "--out", str(out),
               "--limit", "4", "--batch-size", "2", "--max-new-tokens", "2", "--workers", "1", "--no-tracking"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["model"], r["compressor"]) for r in summary["rows"]] == [("model-dpn", "static")]
    preds = _read(out / "model-dpn" / "static" / "synthetic" / "predictions.jsonl")
    assert [p["question_id"] for p in preds] == [0, 1, 2, 3]
    # static: the default fixed path (4, 2, 1) pools 8x8 -> 4x4 -> 4x2; the third DPE sees 8 < 16 tokens.
    assert {p["metadata"]["routing_path"] for p in preds} == {"4-2-n"}
    assert preds[0]["metadata"]["visual_tokens_per_layer"] == [64, 16, 8, 8]


def test_cli_eval_run_bad_input_exits_2(assets, capsys):
    from jobs.cli import main

    rc = main(["eval", "run", "--model", str(assets["model_none"]), "--benchmarks", "synthetic",
               "--data-root", str(assets["data_root"]), "--compressors", "dpn", "--no-tracking"])
    assert rc == 2
    assert "no router weights" in capsys.readouterr().err


@pytest.mark.slow
def test_injection_seam_rejects_unknown_shard_keys(assets, tmp_path, ray_cluster):
    cfg = _config(assets, tmp_path, inject_failures={"tiny/dpn/synthetic/99": 1})
    with pytest.raises(ValueError, match="inject_failures names no shard.*synthetic/99"):
        run.run_evaluation(cfg, log=lambda m: None)


def test_routing_summary_and_table_order_levels_easiest_first():
    def rec(path, tflops, difficulty):
        return {"metadata": {"routing_path": path, "prefill_tflops": tflops, "prefill_tflops_exact": tflops,
                             "baseline_prefill_tflops": 4.0, "vision_tflops": 0.5, "difficulty": difficulty}}

    records = [rec("4-2-1", 1.0, "hard"), rec("1-1-1", 4.0, "hard"), rec("4-2-1", 1.0, "easy"),
               rec("4-2-1", 1.0, "easy"), rec("2-2-2", 2.0, "medium")]
    bench = {"primary": 60.0, **report.aggregate(records),
             "metrics": {"accuracy": 60.0, "num_samples": 5,
                         "per_difficulty": {"hard": 50.0, "easy": 100.0, "medium": 0.0}},
             "predictions": "p.jsonl"}
    row = report.summary_row("m", "dpn", {"synthetic": bench})
    rs = report.routing_summary(row)
    assert list(rs["path_share_by_difficulty"]) == ["easy", "medium", "hard"]
    assert rs["path_share"] == pytest.approx({"1-1-1": 0.2, "2-2-2": 0.2, "4-2-1": 0.6})
    assert rs["path_share_by_difficulty"]["hard"] == pytest.approx({"1-1-1": 0.5, "4-2-1": 0.5})
    assert rs["mean_tflops_by_difficulty"] == pytest.approx({"easy": 1.0, "medium": 2.0, "hard": 2.5})
    assert list(rs["accuracy_by_difficulty"]) == ["easy", "medium", "hard"]
    metrics = report.child_metrics(row)
    assert metrics["routing/synthetic/hard/prefill_tflops_per_sample"] == pytest.approx(2.5)
    assert metrics["routing/synthetic/hard/share_pct/1-1-1"] == pytest.approx(50.0)
    table = report.format_routing_table({"rows": [row]}).splitlines()
    assert table[0].split()[:4] == ["m/dpn", "4-2-1", "1-1-1", "2-2-2"]
    assert [line.split()[0] for line in table[1:4]] == ["easy", "medium", "hard"]
    assert table[3].split()[1:3] == ["50.0", "50.0"]  # hard: half on 4-2-1, half on 1-1-1


def test_budget_outside_the_calibrated_range_is_refused_naming_it(assets, tmp_path, capsys):
    import json as _json

    from jobs.cli import main

    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    cfg = _json.loads((model / "config.json").read_text())
    cfg["budget_curve"] = {"bias": [-10.0, 0.0, 10.0], "flops_fraction": [1.0, 0.8, 0.55]}
    (model / "config.json").write_text(_json.dumps(cfg))
    rc = main(["eval", "run", "--model", str(model), "--benchmarks", "synthetic", "--data-root",
               str(assets["data_root"]), "--compressors", "dpn", "--budget", "0.3", "--no-tracking",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "budget 0.3 is outside" in err and "[0.550, 1.000]" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="has no budget_curve"):
        inference.check_checkpoint(assets["model"], "dpn", budget=0.7)
    assert inference.check_checkpoint(model, "dpn", budget=0.7)["budget_curve"]
