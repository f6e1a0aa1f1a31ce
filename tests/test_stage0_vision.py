"""Stage 0 of the tiny recipe: per-patch labels, the tower learns, the saved tower loads (its caching is
the DAG's: tests/test_pipeline.py, tests/test_training.py)."""

from __future__ import annotations

import pytest
import torch

from pipelines.data.synth.scenes import COLOR_NAMES, SHAPES, Obj, Scene
from pipelines.recipes import VisionPretrainSpec, get_recipe
from pipelines.training.stage0.vision import patch_labels, pretrain_vision

RED, BLUE = 1 + COLOR_NAMES.index("red"), 1 + COLOR_NAMES.index("blue")
SQUARE, CIRCLE = SHAPES.index("square"), SHAPES.index("circle")


def test_patch_labels_follow_the_scene_geometry_on_the_padded_canvas():
    # 48 x 24 canvas padded to 48 x 48 (12 px above and below); 4-px patches -> a 12 x 12 grid whose patch
    # (i, j) centre lies at canvas (4j + 2, 4i + 2 - 12).
    scene = Scene(width=48, height=24, background="white", objects=[
        Obj(shape="square", color="red", size="large", x=12, y=12, r=6),   # x, y in [6, 18]
        Obj(shape="circle", color="blue", size="small", x=36, y=12, r=4),
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


def test_stage0_placeholder_is_validated():
    from pipelines.training.driver import run_stage

    with pytest.raises(ValueError, match=r"model\.vision_path.*stage 2"):
        get_recipe("tiny", 2, ["model.init=random", "model.vision_path=<stage0>"])
    with pytest.raises(ValueError, match=r"model\.vision_path.*init='random' or 'components'"):
        get_recipe("tiny", 2, ["model.vision_path=/tmp/clip"])
    with pytest.raises(ValueError, match=r"vision_pretrain\.steps"):
        get_recipe("tiny", 1, ["vision_pretrain.steps=0"])
    with pytest.raises(ValueError, match=r"model\.vision_path: '<stage0>' stands for stage 0"):
        run_stage(get_recipe("tiny", 1))
