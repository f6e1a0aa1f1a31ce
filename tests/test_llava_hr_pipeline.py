"""LLaVA-HR through the pipeline: the recipes validate and plan (cluster recipes with placeholder paths), and
the `llava-hr-tiny` pipeline runs end to end on CPU, its stage 2 training the vision tower."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from jobs.cli import main as cli_main
from pipelines.recipes import get_recipe
from pipelines.workflow import load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
DPN = str(Path(sys.executable).parent / "dpn")


@pytest.mark.parametrize("name,layers", [("llava-hr-7b", 32), ("llava-hr-x-13b", 40)])
def test_cluster_recipes_follow_the_reference(name, layers):
    from pipelines.training.model_config import model_config  # noqa: F401  (the recipe's preset must exist for training)

    s1, s2 = get_recipe(name, 1), get_recipe(name, 2)
    assert s1.model.preset == s2.model.preset == name and s1.model.compressor == "none"
    assert s2.model.compressor == "dpn" and s2.model.train_vision_tower and s2.scaling.zero_stage == 3
    assert (s2.optim.lr, s2.optim.global_batch_size, s2.data.max_length) == (2e-5, 128, 2496)
    assert s2.data.add_router_token and s2.model.projector_path == "<stage1>"
    from dpn.presets import get_preset

    cfg = get_preset(name)
    assert cfg.num_image_tokens == 1024 and cfg.dpe_layers == [7, 15, 23]
    assert cfg.text_config.num_hidden_layers == layers
    # Placeholders name the field and how to set it when the stage is about to run.
    with pytest.raises(FileNotFoundError, match=rf"model\.path is not set .*<{name}-base>.*--set model\.path="):
        s1.check_paths()


def test_hr_pipelines_plan_and_missing_corpus_paths_are_named(tmp_path, capsys):
    for name in ("llava-hr-tiny", "llava-hr-7b", "llava-hr-x-13b"):
        cfg = load_pipeline_config(name, None)
        assert cfg.train_recipe == name and cfg.registered_model == f"dpn-{name}"
        rc = cli_main(["pipeline", "plan", "--recipe", name, "--work-dir", str(tmp_path / name)])
        out = capsys.readouterr()
        plan = json.loads(out.out.strip().splitlines()[-1])
        # The plan is also the preflight: a cluster recipe's unset base checkpoint is named, exit 2.
        if name == "llava-hr-tiny":
            assert rc == 0 and plan["problems"] == []
        else:
            assert rc == 2 and f"train_overrides.model.path: not set (the recipe's placeholder '<{name}-base>')" in out.err
        names = {s["name"] for s in plan["steps"]}
        assert {"stage1", "stage2_dpn", "evaluate", "register"} <= names
        assert not any(n.startswith("stage0") for n in names)  # LLaVA-HR starts from CLIP / ConvNeXt / Vicuna
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("corpus: {synthetic: false, pretrain_annotations: /nonexistent/blip_laion_cc_sbu_558k.json,\n"
                   "  instruct_annotations: /nonexistent/mix665k.json, image_root: /nonexistent,\n"
                   "  tokenizer: /nonexistent, eval_root: /nonexistent}\n")
    assert cli_main(["pipeline", "plan", "--recipe", "llava-hr-7b", "--config", str(cfg)]) == 2
    assert "corpus.pretrain_annotations" in capsys.readouterr().err


SMALL = """
corpus: {n_pretrain: 64, n_instruct: 64, n_eval: 15, n_calibration: 15}
variants: [dpn, none]
routing: {samples: 8, fit_steps: 20}
train_overrides: {optim.max_steps: 2, optim.global_batch_size: 16}
"""


def _tensor(model_dir: Path, key: str):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as h:
        return h.get_tensor(key)


@pytest.mark.slow
def test_llava_hr_tiny_pipeline_runs_end_to_end(tmp_path):
    (tmp_path / "p.yaml").write_text(SMALL)
    work = tmp_path / "work"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "HOME": str(Path.home())}
    run = subprocess.run([DPN, "pipeline", "run", "--recipe", "llava-hr-tiny", "--config", str(tmp_path / "p.yaml"),
                          "--work-dir", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert set(summary["results"]) == {"dpn", "none"}
    dpn, none = summary["results"]["dpn"], summary["results"]["none"]
    assert 0 <= dpn["accuracy"]["synthetic"] <= 100 and dpn["prefill_tflops_per_sample"] < none["prefill_tflops_per_sample"]
    stage1 = next((work / "pipeline" / "steps" / "stage1").glob("*/stage1/model"))
    stage2 = next((work / "pipeline" / "steps" / "stage2_dpn").glob("*/stage2/model"))
    config = json.loads((stage2 / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "llava_hr_vision" and config["compressor"] == "dpn"
    # Stage 2 trains the vision tower as LLaVA-HR's does: the zero-initialised adapter projections moved.
    key = "vision_tower.mr_adapters.0.fast_proj.weight"
    assert not _tensor(stage1, key).any() and _tensor(stage2, key).abs().max() > 0
