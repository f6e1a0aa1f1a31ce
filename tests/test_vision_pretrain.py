"""Stage 0 of the tiny recipe: per-patch labels, the tower learns, the saved tower loads, caching."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import synth
from pipelines.recipes import VisionPretrainSpec, get_recipe
from pipelines.vision_pretrain import (
    RESULT_FILE,
    patch_labels,
    pretrain_vision,
    run_vision_pretrain,
    spec_fingerprint,
)

RED, BLUE = 1 + synth.COLOR_NAMES.index("red"), 1 + synth.COLOR_NAMES.index("blue")
SQUARE, CIRCLE = synth.SHAPES.index("square"), synth.SHAPES.index("circle")


def test_patch_labels_follow_the_scene_geometry_on_the_padded_canvas():
    # 48 x 24 canvas padded to 48 x 48 (12 px above and below); 4-px patches -> a 12 x 12 grid whose patch
    # (i, j) centre lies at canvas (4j + 2, 4i + 2 - 12).
    scene = synth.Scene(width=48, height=24, background="white", objects=[
        synth.Obj(shape="square", color="red", size="large", x=12, y=12, r=6),   # x, y in [6, 18]
        synth.Obj(shape="circle", color="blue", size="small", x=36, y=12, r=4),
    ])
    colours, shapes = patch_labels(scene, image_size=48, patch=4)
    assert len(colours) == len(shapes) == 144
    square = {(i, j) for i in (4, 5, 6, 7) for j in (1, 2, 3, 4)}  # centres x 6..18, y 6..18
    circle = {(i, j) for i in (5, 6) for j in (8, 9)}  # centres (34|38, 10|14): 8 <= r^2 = 16
    for i in range(12):
        for j in range(12):
            c, s = colours[12 * i + j], shapes[12 * i + j]
            if (i, j) in square:
                assert (c, s) == (RED, SQUARE), (i, j)
            elif (i, j) in circle:
                assert (c, s) == (BLUE, CIRCLE), (i, j)
            else:
                assert (c, s) == (0, -100), (i, j)  # background: no shape, left out of the shape loss


def test_the_tower_learns_colour_and_loads_into_the_model(tmp_path):
    from dpn.loading import load_vision_tower
    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.presets import get_preset

    rows = []
    spec = VisionPretrainSpec(steps=80, batch_size=16, eval_every=40, eval_images=32)
    summary = pretrain_vision(spec, "tiny", tmp_path / "tower", on_eval=rows.append)
    assert [r["step"] for r in rows] == [40, 80] and summary["steps"] == 80
    # Object patches take one of six colours (chance ~17%); 80 steps reach ~73% with this seed.
    assert summary["color_accuracy_pct"] > 50.0, summary

    model = DPNForConditionalGeneration(get_preset("tiny"))
    saved = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    load_vision_tower(model, tmp_path / "tower")
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tmp_path / "tower", local_files_only=True)
    for k, v in tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[k], v), k
    assert any(not torch.equal(saved[k], v) for k, v in model.vision_tower.state_dict().items())
    # Another geometry is refused, naming the weight.
    other = DPNForConditionalGeneration(get_preset("test-tiny"))
    with pytest.raises(ValueError, match="shape"):
        load_vision_tower(other, tmp_path / "tower")


def test_stage0_is_cached_by_fingerprint_and_never_takes_a_half_written_tower(tmp_path, monkeypatch):
    import pipelines.vision_pretrain as vp

    calls = []

    def in_process(spec, preset, out_dir):  # the Ray task's body, without starting Ray
        calls.append(spec.steps)
        return pretrain_vision(spec, preset, out_dir)

    monkeypatch.setattr(vp, "pretrain_vision_on_ray", in_process)
    small = ["vision_pretrain.steps=2", "vision_pretrain.batch_size=2", "vision_pretrain.eval_images=2",
             f"work_dir={tmp_path}"]
    cfg = get_recipe("tiny", 1, small)
    fp = spec_fingerprint(cfg.vision_pretrain, "tiny")
    stale = tmp_path / "stage0" / f".{fp}.tmp"  # a crashed attempt's leftovers
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    out, summary, cached = run_vision_pretrain(cfg)
    assert (out, cached, calls) == (tmp_path / "stage0" / fp, False, [2])
    assert not stale.exists() and (out / "model.safetensors").stat().st_size > 4
    assert json.loads((out / RESULT_FILE).read_text())["summary"]["steps"] == 2

    again, summary2, cached2 = run_vision_pretrain(cfg)
    assert (again, cached2, calls) == (out, True, [2]) and summary2 == summary
    longer = get_recipe("tiny", 1, [*small, "vision_pretrain.steps=3"])
    assert spec_fingerprint(longer.vision_pretrain, "tiny") != fp
    # Same preset name, another tower geometry: not the cached tower.
    import dpn.presets

    tiny = dpn.presets.PRESETS["tiny"]

    def larger_images(**kw):
        c = tiny(**kw)
        c.vision_config.image_size = 64
        return c

    monkeypatch.setitem(dpn.presets.PRESETS, "tiny", larger_images)
    assert spec_fingerprint(cfg.vision_pretrain, "tiny") != fp
    monkeypatch.setitem(dpn.presets.PRESETS, "tiny", tiny)
    assert spec_fingerprint(cfg.vision_pretrain, "tiny") == fp  # deterministic


def test_stage0_placeholder_is_validated():
    from pipelines.train import run_stage

    with pytest.raises(ValueError, match=r"model\.vision_path.*stage 2"):
        get_recipe("tiny", 2, ["model.init=random", "model.vision_path=<stage0>"])
    with pytest.raises(ValueError, match=r"model\.vision_path.*init='random' or 'components'"):
        get_recipe("tiny", 2, ["model.vision_path=/tmp/clip"])
    with pytest.raises(ValueError, match=r"vision_pretrain\.steps"):
        get_recipe("tiny", 1, ["vision_pretrain.steps=0"])
    with pytest.raises(ValueError, match=r"model\.vision_path: '<stage0>' stands for stage 0"):
        run_stage(get_recipe("tiny", 1))
