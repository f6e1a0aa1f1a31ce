"""Stage 0 of the embedded default: pre-train the tiny recipe's random vision tower on synthetic scenes.

The real recipes start from CLIP ViT-L/336, whose patch features already say what is where; the tiny
recipe has no pretrained tower offline, and a random one gives the LLM nothing readable for hundreds of
steps (bench/RESULTS_learnability.md: 33% = chance after 400 stage-2 steps from a random tower, 46% with
this stage). Stage 0 trains the tower alone, with two linear heads on the features the projector reads
(`vision_feature_layer`, CLS dropped), to name for every patch the colour (or background) and the shape of
the object under its centre. Scenes are drawn fresh every step by the corpus generator
(`pipelines.data.synth.scenes.random_scene`, the caption mix of difficulties); labels come from the scene
geometry, not from pixels. The heads are thrown away; the tower is saved as a `CLIPVisionModel`
directory, which stage 1 loads with `model.vision_path` exactly as the real recipes load CLIP.

Entry points: `pretrain_vision` (the loop, in-process; one torch thread is plenty) and
`pretrain_vision_on_ray` (the same as a one-CPU Ray task: the pipeline's `stage0_vision` step, cached by
the DAG like every step). It runs when stage 1's `model.vision_path` is "<stage0>".
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.data.synth.rendering import covers, render
from pipelines.data.synth.scenes import COLOR_NAMES, PRETRAIN_LEVELS, SHAPES, draw_level, random_scene
from pipelines.recipes import VisionPretrainSpec
from pipelines.training.schedule import lr_factor
from pipelines.training.stage0.common import on_one_cpu


def patch_labels(scene, image_size: int, patch: int) -> tuple[list[int], list[int]]:
    """Colour class (0 = background, 1 + index in `COLOR_NAMES`) and shape index (-100 = background,
    left out of the loss) of the object under each patch centre, row-major, on the padded-to-square canvas
    the image processor makes (scene centred)."""
    side = max(scene.width, scene.height)
    ox, oy = (side - scene.width) // 2, (side - scene.height) // 2
    grid = image_size // patch
    colours, shapes = [], []
    for i in range(grid):
        for j in range(grid):
            x = (j * patch + patch / 2) * side / image_size - ox
            y = (i * patch + patch / 2) * side / image_size - oy
            hit = next((o for o in reversed(scene.objects) if covers(o, x, y)), None)  # drawn last = on top
            colours.append(0 if hit is None else 1 + COLOR_NAMES.index(hit.color))
            # Background patches carry no shape: with background in the shape loss, the object-patch shape
            # accuracy was 41% after 600 steps; without, 60% after 500 and 88% after 1,500.
            shapes.append(-100 if hit is None else SHAPES.index(hit.shape))
    return colours, shapes


def pretrain_vision(spec: VisionPretrainSpec, preset: str, out_dir: str | Path | None = None,
                    on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the vision tower of `preset` (random, seeded) per `spec`; save it (`CLIPVisionModel`
    `save_pretrained`) to `out_dir` if given. `on_eval(row)` gets every evaluation row
    (step, object-patch accuracy per head, train loss, seconds). Returns the summary (last row + timing)."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from dpn.image_processing import build_image_processor, preprocess_images
    from dpn.presets import get_preset
    cfg = get_preset(preset)
    vcfg = cfg.vision_config
    torch.manual_seed(spec.seed)
    tower = AutoModel.from_config(vcfg)  # CLIPVisionModel, as `DPNForConditionalGeneration.vision_tower`
    heads = nn.ModuleDict({"color": nn.Linear(vcfg.hidden_size, 1 + len(COLOR_NAMES)),
                           "shape": nn.Linear(vcfg.hidden_size, len(SHAPES))})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    processor = build_image_processor(vcfg.image_size)

    def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scenes = [random_scene(rng, draw_level(rng, PRETRAIN_LEVELS)) for _ in range(size)]
        pixels = preprocess_images([render(sc) for sc in scenes], processor)  # (N, 3, S, S)
        labels = [patch_labels(sc, vcfg.image_size, vcfg.patch_size) for sc in scenes]
        return pixels, {k: torch.tensor([lab[n] for lab in labels]) for n, k in enumerate(("color", "shape"))}

    def forward(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        feats = hidden[:, 1:]  # (N, h*w, d): the patch features the projector reads
        return {k: head(feats) for k, head in heads.items()}  # (N, h*w, classes)

    # Held-out scenes from a seed stream the training draws never use.
    test_pixels, test_labels = batch(random.Random(1_000_003 + spec.seed), spec.eval_images)
    on_object = test_labels["color"] > 0  # (N, h*w) patches under an object

    rng, rows, t0 = random.Random(spec.seed), [], time.perf_counter()
    tower.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.steps, spec.warmup_ratio, spec.schedule)
        pixels, labels = batch(rng, spec.batch_size)
        logits = forward(pixels)
        loss = sum(nn.functional.cross_entropy(logits[k].flatten(0, 1), labels[k].flatten()) for k in heads)
        loss.backward()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            with torch.no_grad():
                out = forward(test_pixels)
            acc = {k: round(100 * float((out[k].argmax(-1) == test_labels[k])[on_object].float().mean()), 2)
                   for k in heads}
            row = {"step": step + 1, "color_accuracy_pct": acc["color"], "shape_accuracy_pct": acc["shape"],
                   "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            if on_eval is not None:
                on_eval(row)
    tower.eval()
    if out_dir is not None:
        tower.save_pretrained(str(out_dir))
    return {**rows[-1], "evals": rows, "steps": spec.steps, "images": spec.steps * spec.batch_size,
            "seconds_per_step": round((time.perf_counter() - t0) / spec.steps, 4)}


def pretrain_vision_on_ray(spec: VisionPretrainSpec, preset: str, out_dir: str | Path) -> dict[str, Any]:
    """`pretrain_vision` as a one-CPU Ray task (`stage0.common.on_one_cpu`)."""
    return on_one_cpu(pretrain_vision, "stage0_vision", spec, preset, str(Path(out_dir).absolute()))


__all__ = ["patch_labels", "pretrain_vision", "pretrain_vision_on_ray"]
