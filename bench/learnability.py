"""Does a tiny model learn the synthetic corpus, and how many steps does it take? One process, no Ray.

    dpn synth --out /tmp/c --pretrain 8000 --instruct 8000 --eval 300
    dpn preprocess --annotations /tmp/c/instruct.json --image-root /tmp/c/images --tokenizer /tmp/c/tokenizer \
        --template vicuna_v1 --router-token --out /tmp/c-instruct
    .venv/bin/python bench/learnability.py corpus --corpus /tmp/c --shards /tmp/c-instruct --steps 600
    .venv/bin/python bench/learnability.py probe --steps 300                # the single-object colour probe
    .venv/bin/python bench/learnability.py probe --skills both --steps 400   # two question types
    .venv/bin/python bench/learnability.py probe --objects 2 --vision /tmp/vit --steps 1200 --eval-every 200  # binding
    .venv/bin/python bench/learnability.py vision --steps 4000 --batch 32 --lr 1e-3 --save /tmp/vit  # = stage 0
    .venv/bin/python bench/learnability.py corpus --corpus /tmp/c --shards /tmp/c-instruct --vision /tmp/vit --steps 600
    .venv/bin/python bench/learnability.py oracle --corpus /tmp/c --out /tmp/c-oracle.json  # images -> scene text
    dpn preprocess --annotations /tmp/c-oracle.json --image-root /tmp/c/images --tokenizer /tmp/c/tokenizer \
        --template vicuna_v1 --out /tmp/c-oracle
    .venv/bin/python bench/learnability.py corpus --corpus /tmp/c --shards /tmp/c-oracle --text-oracle --steps 400
    .venv/bin/python bench/learnability.py text --max-objects 4 --repeat 10 --filler 144 --steps 1200  # no image
    .venv/bin/python bench/learnability.py vision --patch-size 8 --steps 1000 --batch 32 --lr 1e-3 --save /tmp/vit8
    .venv/bin/python bench/learnability.py probe --objects 2 --patch-size 8 --vision /tmp/vit8 --init-std 0.1 --steps 800
    .venv/bin/python bench/learnability.py lm --corpus /tmp/c --steps 6000 --bare-steps 1500 --bare-mix 0.3 --target 75 --save /tmp/llm
    .venv/bin/python bench/learnability.py corpus --corpus /tmp/c --shards /tmp/c-instruct --llm /tmp/llm --vision /tmp/vit

Why a plain loop and not `dpn train`: the question here is how many optimizer steps (and which data mix)
the tiny geometry needs before it reads the image, and iterating on that through Ray Train + DeepSpeed
costs ~30-60 s of start-up per try. The loop trains the same `tiny` model with the recipes' optimizer
(AdamW, warmup + the schedule from `pipelines.training.schedule.lr_factor`, global-norm clipping) on the micro-batches the
training loader makes (`pipelines.data.loader.iter_micro_batches`), and scores with the pipeline's own
`predict` + `score_synthetic`, so a step count found here carries over to the recipes (whose global batch
is spread over workers, which changes nothing but wall time).

Modes:
    corpus  stage-2-style training on preprocessed shards of a synthetic corpus; every `--eval-every`
            steps the synthetic benchmark is answered greedily and scored (overall / category /
            difficulty, against the chance levels in the corpus manifest) and the answers' variety
            is reported (a model that ignores the image gives one answer per question type).
    probe   the easiest visual task there is: one large object of one of the six corpus colours on a
            corpus canvas (drawn by `pipelines.data.synth.rendering.render`), "what colour" -> the colour's token
            right after the image; `--objects 2` asks the colour of the object of a named shape among
            two (binding; `--hops 1` puts the answer right after the shape word instead of one token
            later; `--vision` starts from stage 0's tower); `--skills shape|both` asks the shape, or
            colour or shape drawn per sample
            (two question types, as the corpus has five); `--pool N` trains on N fixed samples instead
            of fresh ones (memorisation). Accuracy (argmax over the ten answer words) on 96 held-out
            images per skill. It separates "the architecture cannot learn from pixels" from "the
            corpus mix is too hard for the budget".
    oracle  write `--out`, the corpus' instruct.json with every image replaced by its scene as text ("Scene:
            a large red circle."; the corpus' own caption of the scene): preprocess it and train `corpus
            --text-oracle` on it to see how fast the tiny LLM learns the questions from a perfect symbolic
            description, i.e. whether the vision side or the LLM limits learning.
    text    the binding probe's question ("what colour is the [shape]", 2 to `--max-objects` objects) with
            the scene as tokens and no image, on the tiny LLM alone: one token per object naming colour
            and shape together (what a patch feature holds), `--repeat`ed and shuffled among `--filler`
            background tokens (as an image's patches), or `--separate` words per object (colour, shape,
            comma: as captions and the oracle write scenes). How many steps binding takes when the
            vision side is perfect, and what the scene's length and form cost.
    lm      the tiny recipe's LLM stage 0 (`pipelines.training.stage0.llm`): the tiny LLM alone on instruct records
            drawn fresh by the corpus generator, every image replaced by its scene as object tokens
            (`<red_circle>`, one per object left to right): how fast the LLM learns the questions when
            perception is perfect. `--bare-steps N` first trains N steps on the bare questions (one short-
            answer question, no system prompt, no instruction), then LLaVA's records in vicuna_v1
            (`--bare-mix` of the samples stay bare); scored in both forms on held-out questions;
            `--target` stops early. `--save` writes the LLM (object tokens dropped) and the corpus
            tokenizer for `corpus --llm`: a stand-in for the pretrained LLM the real recipes start from.
            (Rounds 6-7 in RESULTS trained on the corpus' own records and scored on its benchmark.)
    vision  the tiny recipe's stage 0 (`pipelines.training.stage0.vision`): pre-train the tiny vision tower alone
            to name the colour and shape of the object under each patch (scenes drawn by the corpus
            generator; labels from the scene geometry) and `--save` it for `corpus --vision`: what a
            CLIP-initialised recipe starts with and a random tiny one lacks.

`corpus --llm DIR` loads that LLM over the random model's (the corpus tokenizer's vocabulary, so the shards'
ids hold); `--projector-steps N` (probe / corpus) trains the projector alone for the first N steps.

`--patch-size P` (corpus / probe / vision) swaps the tiny tower's 4-px patches for P-px ones on the same
48-px image ((48 / P)^2 visual tokens): a bench-local geometry, not a preset.

Use one torch thread per process (the default here): two threads on two busy cores ran 25x slower.
Prints one JSON line per evaluation and a JSON summary as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpn.compressors import COMPRESSORS  # noqa: E402 (after the path set-up above; no torch at import)

TRAIN_PREFIXES = ("multi_modal_projector.", "language_model.", "routers.", "pool_experts.")


def _preset(patch_size: int | None) -> str:
    """The preset the bench builds: `tiny`, or with `--patch-size P` a bench-local variant of it whose tower
    cuts the 48-px image into P-px patches ((48 / P)^2 visual tokens), registered under `tiny-patchP`."""
    if patch_size is None:
        return "tiny"
    from dpn.presets import PRESETS, tiny

    side = tiny().vision_config.image_size
    if patch_size < 1 or side % patch_size:
        raise ValueError(f"--patch-size {patch_size} must divide the tiny image side {side}")

    def variant(**overrides):
        config = tiny(**overrides)
        config.vision_config.patch_size = patch_size  # num_image_tokens follows (a property of the grid)
        return config

    PRESETS[f"tiny-patch{patch_size}"] = variant
    return f"tiny-patch{patch_size}"


def _model(compressor: str, vocab_size: int, pad_token_id: int, seed: int, init_std: float | None = None,
           patch_size: int | None = None):
    import torch

    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.presets import get_preset

    torch.manual_seed(seed)
    config = get_preset(_preset(patch_size), vocab_size=vocab_size, pad_token_id=pad_token_id, compressor=compressor)
    if init_std is not None:  # std of the LLM's (and projector's) random init; the preset's is 0.02
        config.text_config.initializer_range = init_std
    return DPNForConditionalGeneration(config)


def _set_trainable(model, prefixes: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def _trained_prefixes(args) -> tuple[str, ...]:
    return TRAIN_PREFIXES + (("vision_tower.",) if args.train_vision_tower else ())


def _projector_phase(model, step: int, args) -> None:
    """The first --projector-steps train the projector alone (LLaVA's stage 1: it learns to feed the LLM);
    AdamW skips the frozen parameters (no gradient), so one optimizer serves both phases."""
    if step == 0 and args.projector_steps:
        _set_trainable(model, ("multi_modal_projector.",))
    elif step == args.projector_steps and args.projector_steps:
        _set_trainable(model, _trained_prefixes(args))


def _optimizer(model, args):
    import torch

    _set_trainable(model, _trained_prefixes(args))
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def _step(loss_fn, params, opt, micro_batches, step: int, args) -> float:
    """One optimizer step (scheduled lr, accumulation, clipping); `loss_fn(micro_batch)` -> scalar loss."""
    import torch

    from pipelines.training.schedule import lr_factor

    for group in opt.param_groups:
        group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_ratio, args.schedule)
    total = 0.0
    for batch in micro_batches:
        loss = loss_fn(batch) / len(micro_batches)
        if loss.requires_grad:  # False for a text-only micro-batch while only the projector trains
            loss.backward()
        total += float(loss.detach())
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


# ----- text oracle ----------------------------------------------------------------------------------
def _scene_text(scene: dict) -> str:
    """A scene record (`scenes.jsonl`) as the text that replaces its image: the corpus' caption."""
    from pipelines.data.synth.questions import caption
    from pipelines.data.synth.scenes import Obj, Scene

    sc = Scene(scene["width"], scene["height"], scene["background"], [Obj(**o) for o in scene["objects"]])
    return f"Scene: {caption(sc)}."


def run_oracle(args) -> dict:
    from dpn.constants import IMAGE_TOKEN

    corpus = Path(args.corpus)
    with open(corpus / "scenes.jsonl") as f:
        scenes = {d["image"]: d for d in map(json.loads, f)}
    records = json.loads((corpus / "instruct.json").read_text())
    replaced = 0
    for r in records:
        if "image" in r:
            turn = r["conversations"][0]
            turn["value"] = turn["value"].replace(IMAGE_TOKEN, _scene_text(scenes[r.pop("image")]))
            replaced += 1
    Path(args.out).write_text(json.dumps(records))
    return {"mode": "oracle", "records": len(records), "images_replaced": replaced, "out": args.out}


# ----- corpus mode ----------------------------------------------------------------------------------
# Long on purpose: the bench's whole corpus experiment (model, data, loop, evaluations) in the order it runs.
def run_corpus(args) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from dpn.eval.scoring import score_synthetic
    from dpn.inference import predict
    from dpn.processing_dpn import DPNProcessor
    from pipelines.data.loader import iter_micro_batches, open_shards
    from pipelines.evaluation.benchmarks import load_benchmark

    corpus = Path(args.corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"), local_files_only=True)
    info = open_shards(args.shards)
    model = _model(args.compressor, max(len(tokenizer), 64), tokenizer.pad_token_id, args.seed, args.init_std,
                   args.patch_size)
    if args.init:  # a curriculum: continue from an earlier run's `--save`
        from dpn.modeling_dpn import DPNForConditionalGeneration

        model = DPNForConditionalGeneration.from_pretrained(args.init, compressor=args.compressor)
    elif args.vision:  # the tiny recipe's start: stage 0's tower, random LLM
        from dpn.loading import load_vision_tower

        load_vision_tower(model, args.vision)
    if args.llm:  # an LLM that arrives knowing the questions on object tokens (`lm --save`), as Vicuna arrives
        from dpn.loading import load_language_model

        load_language_model(model, args.llm, tokenizer)  # refuses another corpus' LLM (other token ids)
    if info.num_image_tokens != model.config.num_image_tokens:
        raise ValueError(f"--shards {args.shards}: {info.num_image_tokens} visual tokens per image, the tiny model "
                         f"takes {model.config.num_image_tokens}; preprocess with the tiny geometry")
    bench = load_benchmark("synthetic", corpus / "eval", limit=args.eval_limit)
    if args.text_oracle:  # the questions with their scene as text, no image (shards from `oracle`)
        import dataclasses

        with open(corpus / "eval" / "synthetic" / "scenes.jsonl") as f:
            scenes = {d["question_id"]: d for d in map(json.loads, f)}
        bench = dataclasses.replace(bench, items=[
            dataclasses.replace(it, text=f"{_scene_text(scenes[it.question_id])}\n{it.text}", image=None)
            for it in bench.items])
    truth = {g["question_id"]: g for g in bench.ground_truth}
    processor = DPNProcessor.from_model_config(model.config, tokenizer)
    params, opt = _optimizer(model, args)
    table = pq.read_table(list(info.files))

    def batches():
        epoch = 0
        while True:
            yield from iter_micro_batches(table, info, micro_batch_size=args.micro_batch, seed=args.seed, epoch=epoch,
                                          drop_last=True)
            epoch += 1

    def evaluate(step: int) -> dict:
        model.eval()
        records = predict(model, processor, bench.items, compressor=args.compressor, benchmark="synthetic",
                          model_id="learnability", batch_size=16, max_new_tokens=8)
        model.train()
        scores = score_synthetic([(truth[r["question_id"]], r["text"]) for r in records])
        by_category: dict[str, Counter] = {}
        for r in records:
            by_category.setdefault(r["metadata"]["category"], Counter())[r["text"]] += 1
        return {
            "step": step,
            "accuracy_pct": round(scores["accuracy"], 2),
            "per_category_pct": {k: round(v, 1) for k, v in scores["per_category"].items()},
            "per_difficulty_pct": {k: round(v, 1) for k, v in scores["per_difficulty"].items()},
            "per_category_difficulty_pct": {k: round(v, 1) for k, v in scores["per_category_difficulty"].items()},
            # 1 distinct answer per category = the image is ignored (answers are the question type's prior).
            "distinct_answers": {k: len(v) for k, v in sorted(by_category.items())},
            "routing_paths": dict(Counter(r["metadata"]["routing_path"] for r in records)),
        }

    chance = {k: round(100 * v["chance"], 1) for k, v in manifest["eval"]["categories"].items()}
    accum = args.batch // args.micro_batch
    stream = batches()
    evals, t0, losses = [], time.perf_counter(), []
    for step in range(args.steps):
        _projector_phase(model, step, args)
        losses.append(_step(lambda b: model(**b).loss, params, opt, [next(stream) for _ in range(accum)], step, args))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = evaluate(step + 1)
            row.update(train_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
                       seconds=round(time.perf_counter() - t0, 1))
            evals.append(row)
            print(json.dumps(row), flush=True)
    if args.save:
        model.save_pretrained(args.save)
    return {"mode": "corpus", "chance_pct": chance, "uniform_chance_pct": round(100 * manifest["eval"]["uniform_chance"], 1),
            "final": evals[-1], "steps": args.steps, "batch": args.batch, "lr": args.lr, "llm": args.llm,
            "projector_steps": args.projector_steps,
            "seconds_per_step": round((time.perf_counter() - t0) / args.steps, 3)}


# ----- probe mode -----------------------------------------------------------------------------------
def _probe_sample(rng: random.Random, objects: int):
    """(image, colour index, asked-shape index): one or two large objects on a corpus canvas."""
    from pipelines.data.synth.rendering import render
    from pipelines.data.synth.scenes import BACKGROUNDS, CANVASES, COLOR_NAMES, SHAPES, Obj, Scene

    colors, shapes = list(COLOR_NAMES), list(SHAPES)
    w, h = rng.choice(CANVASES)
    scene = Scene(w, h, rng.choice(sorted(BACKGROUNDS)))
    side = max(w, h)
    picked_colors = rng.sample(range(len(colors)), objects)
    picked_shapes = rng.sample(range(len(shapes)), objects)
    slots = [(0.3, 0.5), (0.7, 0.5)] if objects == 2 else [(0.5, 0.5)]
    rng.shuffle(slots)
    for (fx, fy), c, s in zip(slots, picked_colors, picked_shapes, strict=True):
        r = round(side * rng.uniform(0.12, 0.15)) if objects == 1 else round(side * rng.uniform(0.09, 0.11))
        x = round(w * fx + rng.uniform(-0.08, 0.08) * w)
        y = round(h * fy + rng.uniform(-0.2, 0.2) * h)
        x, y = min(max(x, r + 1), w - r - 2), min(max(y, r + 1), h - r - 2)
        scene.objects.append(Obj(shape=shapes[s], color=colors[c], size="large", x=x, y=y, r=r))
    return render(scene), picked_colors[0], picked_shapes[0]


def run_probe(args) -> dict:
    import torch

    from dpn.image_processing import build_image_processor, preprocess_images

    # Token ids of a 64-word toy vocabulary: bos 1, eos 2, pad 3, <image> 4, <ROUTER> 5; questions
    # "what colour is [shape k]" = 10, 11, 12+k and "what shape is [colour k]" = 10, 16, 17+k; answers
    # 40-45 (the six colours) and 46-49 (the four shapes); 50-63 fill the fixed prefix / gap.
    # With --text-pretrain the vocabulary also holds the text task's object tokens (64 ids otherwise, so
    # that the runs without it keep their numbers).
    model = _model(args.compressor, TEXT_VOCAB if args.text_pretrain else 64, 3, args.seed, args.init_std,
                   args.patch_size)
    if args.vision:  # stage 0's tower instead of a random one (the tiny recipe's start)
        from dpn.loading import load_vision_tower

        load_vision_tower(model, args.vision)
    text_evals = []
    if args.text_pretrain:  # an LLM that arrives knowing the task on one-token objects (as Vicuna arrives)
        text_evals = _train_text(model.language_model, args, args.text_pretrain)
        print(json.dumps({"text_pretrain": text_evals[-1]}), flush=True)
    n_img = model.config.num_image_tokens
    processor = build_image_processor(model.config.vision_config.image_size)
    skills = ("color", "shape") if args.skills == "both" else (args.skills,)

    def sample(rng: random.Random):
        image, c, s = _probe_sample(rng, args.objects)
        skill = rng.choice(skills)
        question, answer = ([10, 11, 12 + s], 40 + c) if skill == "color" else ([10, 16, 17 + c], 46 + s)
        return preprocess_images([image], processor)[0], question, answer, skill

    def collate(samples):
        prefix = [50 + i % 14 for i in range(args.prefix_tokens)]  # a fixed "system prompt"
        gap = [50 + (5 * i) % 14 for i in range(args.gap_tokens)]  # fixed words between image and question
        # --hops 2: <ROUTER> between the asked word and the answer, so the answer's position must first
        # fetch the word, then the image (as after LLaVA's prompt); 1: the answer right after the word.
        ids = torch.tensor([[1] + prefix + [4] * n_img + gap + (q + [5] if args.hops == 2 else [5] + q) + [a, 2]
                            for _, q, a, _ in samples])
        labels = ids.clone()
        labels[:, :-2] = -100  # the answer and eos only
        pixels = torch.stack([p for p, _, _, _ in samples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}

    test_samples = [sample(random.Random(10_000 + args.seed + i)) for i in range(96 * len(skills))]
    test = collate(test_samples)
    answers = torch.tensor([a for _, _, a, _ in test_samples])
    rng, evals, t0 = random.Random(args.seed), [], time.perf_counter()
    # --pool N: a finite training set of N samples drawn with replacement (as an epoch-based corpus),
    # 0: a fresh sample every time (no image is seen twice).
    pool = [sample(rng) for _ in range(args.pool)]
    params, opt = _optimizer(model, args)
    for step in range(args.steps):
        _projector_phase(model, step, args)
        picked = [rng.choice(pool) for _ in range(args.batch)] if pool else [sample(rng) for _ in range(args.batch)]
        loss = _step(lambda b: model(**b).loss, params, opt, [collate(picked)], step, args)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                # The position that predicts the answer; argmax over every answer word (10 of them).
                logits = model(**test).logits[:, -3, 40:50]
            model.train()
            right = (logits.argmax(-1) + 40 == answers).float()
            per_skill = {k: round(100 * float(right[[i for i, t in enumerate(test_samples) if t[3] == k]].mean()), 1)
                         for k in skills}
            row = {"step": step + 1, "accuracy_pct": round(100 * float(right.mean()), 1), "per_skill_pct": per_skill,
                   "train_loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)}
            evals.append(row)
            print(json.dumps(row), flush=True)
    return {"mode": "probe", "objects": args.objects, "skills": list(skills), "pool": args.pool, "hops": args.hops,
            "init_std": args.init_std, "text_pretrain": text_evals[-1] if text_evals else None,
            "projector_steps": args.projector_steps,
            "chance_pct": {"color": round(100 / 6, 1), "shape": 25.0}, "final": evals[-1],
            "best_accuracy_pct": max(e["accuracy_pct"] for e in evals), "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "seconds_per_step": round((time.perf_counter() - t0) / args.steps, 3)}


# ----- text mode ------------------------------------------------------------------------------------
TEXT_VOCAB = 96  # the probe's 64 toy ids + 24 object tokens + 4 background tokens + 4 spare


def _text_sampler(args):
    """Samples of the text task: the probe's binding question with the scene as tokens (`run_text`).

    Token ids as in the probe (bos 1, eos 2, pad 3, ROUTER 5, "what colour is [shape k]" 10 11 12+k,
    colours 40-45); a scene object is one token naming colour and shape together (64 + 6 * shape +
    colour: what a patch feature holds), or with `--separate` three (colour 40+c, shape 46+s, comma 20);
    background tokens 88-91 pad the scene to `--filler` tokens. The sequence is the probe's with the
    image's tokens replaced by the scene's."""

    def sample(rng: random.Random) -> list[int]:
        n = rng.randint(2, args.max_objects)
        colors, shapes = rng.sample(range(6), n), rng.sample(range(4), n)
        # Units that stay in order: an object's words (--separate), else each copy of an object's token.
        units = []
        for c, s in zip(colors, shapes, strict=True):
            units += [[40 + c, 46 + s, 20]] if args.separate else [[64 + 6 * s + c]] * args.repeat
        if args.filler:
            units += [[88 + rng.randrange(4)] for _ in range(args.filler - sum(map(len, units)))]
            rng.shuffle(units)  # objects anywhere among the background, as patches
        scene = [t for unit in units for t in unit]
        k = rng.randrange(n)
        return [1] + scene + [10, 11, 12 + shapes[k], 5, 40 + colors[k], 2]

    return sample


def _text_batch(rows: list[list[int]]) -> dict:
    """Left-padded so that the answer sits at the same place (-3 predicts it) in every row."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 3)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # the answer and eos only
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train_text(model, args, steps: int, on_eval=None) -> list[dict]:
    """`steps` optimizer steps of the text task on `model` (a causal LM: the tiny LLM alone), the bench's
    optimizer and schedule; every `--eval-every` steps the accuracy on 256 held-out scenes."""
    import torch

    sample = _text_sampler(args)
    test = _text_batch([sample(random.Random(10_000 + args.seed + i)) for i in range(256)])
    lr = args.text_lr or args.lr
    batch = args.text_batch or args.batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = argparse.Namespace(**{**vars(args), "steps": steps, "lr": lr})  # warmup / decay over these steps
    rng, evals, t0 = random.Random(args.seed), [], time.perf_counter()
    for step in range(steps):
        loss = _step(lambda b: model(**b).loss, params, opt, [_text_batch([sample(rng) for _ in range(batch)])],
                     step, schedule)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=test["input_ids"], attention_mask=test["attention_mask"]).logits[:, -3, 40:46]
            model.train()
            accuracy = float((logits.argmax(-1) + 40 == test["input_ids"][:, -2]).float().mean())
            row = {"step": step + 1, "accuracy_pct": round(100 * accuracy, 1), "train_loss": round(loss, 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            evals.append(row)
            if on_eval is not None:
                on_eval(row)
    return evals


def run_text(args) -> dict:
    """The binding question of `probe --objects 2` with the scene given as tokens: the tiny LLM alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpn.presets import get_preset

    torch.manual_seed(args.seed)
    config = get_preset("tiny", vocab_size=TEXT_VOCAB, pad_token_id=3).text_config
    if args.init_std is not None:
        config.initializer_range = args.init_std
    model = AutoModelForCausalLM.from_config(config)
    t0 = time.perf_counter()
    evals = _train_text(model, args, args.steps, on_eval=lambda row: print(json.dumps(row), flush=True))
    return {"mode": "text", "separate": args.separate, "repeat": args.repeat, "filler": args.filler,
            "max_objects": args.max_objects, "init_std": args.init_std, "final": evals[-1],
            "steps": args.steps, "batch": args.text_batch or args.batch, "lr": args.text_lr or args.lr,
            "seconds_per_step": round((time.perf_counter() - t0) / args.steps, 3)}


# ----- lm mode --------------------------------------------------------------------------------------
def run_lm(args) -> dict:
    """The tiny recipe's LLM stage 0 (`pipelines.training.stage0.llm`) with the bench's step counts, curriculum and
    lr: the tiny LLM alone on fresh instruct records with every scene as object tokens, bare form first.
    `--target` stops it once the held-out accuracy in the template reaches that (100: never early);
    `--save` writes the LLM with the corpus tokenizer for `corpus --llm`."""
    from pipelines.recipes import LLMPretrainSpec
    from pipelines.training.stage0.llm import pretrain_llm

    spec = LLMPretrainSpec(steps=args.steps, bare_steps=args.bare_steps, bare_mix=args.bare_mix,
                           target_accuracy_pct=args.target, batch_size=args.batch, lr=args.lr,
                           warmup_ratio=args.warmup_ratio, schedule=args.schedule, grad_clip=args.grad_clip,
                           seed=args.seed, eval_questions=args.eval_limit, eval_every=args.eval_every,
                           **({} if args.init_std is None else {"init_std": args.init_std}))
    summary = pretrain_llm(spec, _preset(None), Path(args.corpus) / "tokenizer", args.save,
                           on_eval=lambda row: print(json.dumps(row), flush=True))
    return {"mode": "lm", **{k: v for k, v in summary.items() if k != "evals"}, "bare_steps": args.bare_steps,
            "bare_mix": args.bare_mix, "batch": args.batch, "lr": args.lr}


# ----- vision mode ----------------------------------------------------------------------------------
def run_vision(args) -> dict:
    """Stage 0 of the tiny recipe (`pipelines.training.stage0.vision`) with the bench's step count, batch and lr;
    `--save` writes the tower (a CLIPVisionModel directory) for `corpus --vision`."""
    from pipelines.recipes import VisionPretrainSpec
    from pipelines.training.stage0.vision import pretrain_vision

    spec = VisionPretrainSpec(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_ratio=args.warmup_ratio,
                              schedule=args.schedule, grad_clip=args.grad_clip, seed=args.seed,
                              eval_every=args.eval_every)
    summary = pretrain_vision(spec, _preset(args.patch_size), args.save,
                              on_eval=lambda row: print(json.dumps(row), flush=True))
    return {"mode": "vision", **{k: v for k, v in summary.items() if k != "evals"}, "batch": args.batch, "lr": args.lr}


# Long on purpose: one flat list of the six modes' command-line options.
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("corpus", "probe", "vision", "oracle", "text", "lm"))
    ap.add_argument("--corpus", help="corpus / vision / lm mode: a `dpn synth` output directory")
    ap.add_argument("--shards", help="corpus mode: `dpn preprocess` output of its instruct.json (tiny geometry)")
    ap.add_argument("--init", help="corpus mode: start from this saved model (an earlier run's --save)")
    ap.add_argument("--llm", help="corpus mode: the random model's LLM and tokenizer from this `lm --save`")
    ap.add_argument("--bare-steps", type=int, default=0, help="lm mode: first steps on the bare questions")
    ap.add_argument("--target", type=float, default=100.0,
                    help="lm mode: stop once the held-out accuracy in the template reaches this (%%; 100: never)")
    ap.add_argument("--bare-mix", type=float, default=0.0,
                    help="lm mode: fraction of bare samples after --bare-steps (the rest: records in vicuna_v1)")
    ap.add_argument("--vision", help="corpus / probe mode: a random model with this vision tower (a `vision --save`)")
    ap.add_argument("--save", help="corpus mode: save the trained model here; vision mode: the trained tower; "
                                   "lm mode: the LLM and its tokenizer")
    ap.add_argument("--out", help="oracle mode: where to write the text-oracle annotations (a LLaVA JSON array)")
    ap.add_argument("--text-oracle", action="store_true",
                    help="corpus mode: ask the benchmark with each image's scene as text (shards made from `oracle`)")
    ap.add_argument("--compressor", default="none", choices=COMPRESSORS)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (the tiny stage-2 recipe's)")
    ap.add_argument("--schedule", default="constant", choices=("cosine", "linear", "constant"),
                    help="lr schedule after warmup (the tiny stage-2 recipe's: constant)")
    ap.add_argument("--warmup-ratio", type=float, default=0.03)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--train-vision-tower", action=argparse.BooleanOptionalAction, default=False,
                    help="also train the vision tower (the tiny recipe keeps it frozen, as LLaVA does)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=300, help="corpus / lm mode: benchmark questions scored")
    ap.add_argument("--objects", type=int, default=1, choices=(1, 2), help="probe mode: objects per image")
    ap.add_argument("--prefix-tokens", type=int, default=0, help="probe mode: fixed text tokens before the image")
    ap.add_argument("--gap-tokens", type=int, default=0, help="probe mode: fixed text tokens after the image")
    ap.add_argument("--hops", type=int, default=2, choices=(1, 2),
                    help="probe mode: 2 = a token between the question's last word and the answer (the answer's "
                         "position fetches the word, then the image); 1 = the answer right after the word")
    ap.add_argument("--init-std", type=float, default=None,
                    help="std of the random LLM's init (default: the tiny preset's 0.02; lm mode: the stage's 0.1)")
    ap.add_argument("--patch-size", type=int, default=None,
                    help="corpus / probe / vision mode: the tiny tower's patch side in pixels (default 4: 144 visual "
                         "tokens; 8: 36). Shards for corpus mode: `dpn preprocess --num-image-tokens` to match")
    ap.add_argument("--separate", action="store_true",
                    help="text mode: each object as colour word, shape word, comma (default: one token for both)")
    ap.add_argument("--repeat", type=int, default=1, help="text mode: copies of each object's token")
    ap.add_argument("--filler", type=int, default=0,
                    help="text mode: pad the scene to this many tokens with background tokens, shuffled (0: none)")
    ap.add_argument("--max-objects", type=int, default=2, help="text mode: objects per scene, 2 to this (at most 4)")
    ap.add_argument("--text-pretrain", type=int, default=0,
                    help="probe mode: first train the LLM alone this many steps on the text mode's task (options "
                         "--max-objects / --repeat / --filler / --separate)")
    ap.add_argument("--text-lr", type=float, default=None, help="text mode / --text-pretrain: lr (default --lr)")
    ap.add_argument("--text-batch", type=int, default=None,
                    help="text mode / --text-pretrain: samples per step (default --batch)")
    ap.add_argument("--projector-steps", type=int, default=0,
                    help="probe / corpus mode: the first this many steps train the projector only (LLaVA's stage 1)")
    ap.add_argument("--skills", default="color", choices=("color", "shape", "both"),
                    help="probe mode: what the questions ask (both: colour or shape, drawn per sample)")
    ap.add_argument("--pool", type=int, default=0,
                    help="probe mode: train on a fixed set of this many samples (0: a fresh sample each time)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("text_lr", "text_batch"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("text_pretrain", "projector_steps"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.projector_steps >= args.steps:
        ap.error(f"--projector-steps {args.projector_steps} leaves none of --steps {args.steps} for the whole model")
    for name in ("steps", "batch", "micro_batch", "eval_every", "threads", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch % args.micro_batch:
        ap.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if args.mode == "corpus" and not (args.corpus and args.shards):
        ap.error("corpus mode needs --corpus and --shards")
    if args.mode == "lm" and not args.corpus:
        ap.error("lm mode needs --corpus")
    if not 0 <= args.bare_steps <= args.steps:
        ap.error(f"--bare-steps must be in [0, --steps {args.steps}], got {args.bare_steps}")
    if not 0.0 <= args.bare_mix <= 1.0:
        ap.error(f"--bare-mix must be in [0, 1], got {args.bare_mix}")
    if args.llm and (args.init or args.init_std is not None or args.mode != "corpus"):
        ap.error(f"--llm {args.llm} loads an LLM into corpus mode's random model (not with --init or --init-std)")
    if args.mode == "oracle" and not (args.corpus and args.out):
        ap.error("oracle mode needs --corpus and --out")
    if not 2 <= args.max_objects <= 4:
        ap.error(f"--max-objects must be in [2, 4] (four shapes), got {args.max_objects}")
    if args.separate and args.repeat != 1:
        ap.error(f"--repeat {args.repeat} repeats a one-token object; --separate objects are three tokens")
    longest = args.max_objects * (3 if args.separate else args.repeat)
    if args.filler and args.filler < longest:
        ap.error(f"--filler {args.filler} is shorter than a scene of {args.max_objects} objects ({longest} tokens)")
    try:
        _preset(args.patch_size)
    except ValueError as e:
        ap.error(str(e))
    if args.init and args.vision:
        ap.error("--init (a whole saved model) and --vision (a tower for a random model) exclude each other")
    if args.init and args.init_std is not None:
        ap.error(f"--init-std {args.init_std} sets a random LLM's init; --init {args.init} loads trained weights instead")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    modes = {"corpus": run_corpus, "probe": run_probe, "vision": run_vision, "oracle": run_oracle, "text": run_text,
             "lm": run_lm}
    summary = modes[args.mode](args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
