"""Stage 0 of the embedded default, language side: teach the tiny recipe's random LLM the corpus' questions.

The real recipes start from Vicuna, which arrives knowing how to read a question and answer it; the tiny
recipe has no pretrained LLM offline, and a random one must learn the questions, the answers and which
visual token to look at all at once from the images, which the demo's budget does not reach (45-49%
against 33% chance; bench/RESULTS_learnability.md, round 7). This stage trains the LLM alone on the
corpus' own instruct records with every image replaced by its scene as **object tokens** (`<red_circle>`,
one per object, left to right: what a patch feature of the stage-0 tower names), drawn fresh every step
by the corpus generator (`pipelines.data.synth.questions.draw_instruct_item`). A curriculum, because the LLaVA form
from the start was measured at 55% after 3,000 steps: the first `bare_steps` train the *bare* form (one
short-answer question, no system prompt, no "Answer the question using a single word or phrase."), then
LLaVA's records in vicuna_v1 with `bare_mix` of the samples still bare. The LLM learns to bind (which
object is the circle?) at a step that varies by seed (1,500-3,500 measured), so the stage stops when the
held-out accuracy in the template reaches `target_accuracy_pct`, or after `steps`.

The object tokens are scaffolding, as stage 0's vision heads: their embedding rows are dropped before
saving, so the saved LLM (`LlamaForCausalLM` directory, with the corpus tokenizer) has exactly the
stage's vocabulary and stage 1 loads it with `model.llm_path` as the real recipes load Vicuna.

Entry points mirror `stage0.vision`: `pretrain_llm` (the loop, in-process, one thread) and
`pretrain_llm_on_ray` (a one-CPU Ray task: the pipeline's `stage0_llm` step, cached by the DAG). It runs
when stage 1's `model.llm_path` is "<stage0>".
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.data.synth.questions import (
    ANSWERS,
    CATEGORIES,
    SHORT_ANSWER_PROMPT,
    draw_instruct_item,
    eval_items,
    short_question,
)
from pipelines.data.synth.scenes import COLOR_NAMES, SHAPES
from pipelines.recipes import LLMPretrainSpec
from pipelines.training.model_config import random_vocab_size
from pipelines.training.schedule import lr_factor
from pipelines.training.stage0.common import on_one_cpu

TEMPLATE = "vicuna_v1"  # stage 2's template: the form the LLM must answer in


def object_token(color: str, shape: str) -> str:
    """One token naming an object's colour and shape together, as a patch feature of the tower does."""
    return f"<{color}_{shape}>"


def object_tokens() -> list[str]:
    return [object_token(c, s) for c in COLOR_NAMES for s in SHAPES]


def scene_text(scene) -> str:
    """A `pipelines.data.synth.scenes.Scene` as the text that stands in for its image: "Scene: <red_circle> ...."
    (objects left to right)."""
    return "Scene: " + " ".join(object_token(o.color, o.shape) for o in sorted(scene.objects, key=lambda o: o.x)) + "."


def bare_sample(tokenizer, scene: str, question: str, answer: str | None = None) -> tuple[list[int], list[int]] | list[int]:
    """The curriculum's first form: [bos] "{scene}\\n{question} ASSISTANT:" [" answer" eos], the question
    without the short-answer instruction. Returns (input ids, labels), or the prompt ids without `answer`."""
    question = question.replace(f"\n{SHORT_ANSWER_PROMPT}", "")
    ids = [tokenizer.bos_token_id] + tokenizer(f"{scene}\n{question} ASSISTANT:", add_special_tokens=False).input_ids
    if answer is None:
        return ids
    target = tokenizer(f" {answer}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return ids + target, [-100] * len(ids) + target


def _samples(rng: random.Random, tokenizer, bare: bool) -> list[tuple[list[int], list[int]]]:
    """One freshly drawn instruct record: in the bare form, one sample per short-answer turn (records of
    sentences or a caption only give none); else the whole record in the template, scene for `<image>`."""
    from dpn.conversation import tokenize_conversation
    scene, pairs = draw_instruct_item(rng)
    text = scene_text(scene)
    if bare:
        short = {a for answers in ANSWERS.values() for a in answers}
        return [bare_sample(tokenizer, text, q, a) for q, a in pairs if a in short]
    turns = []
    for i, (human, gpt) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{text}\n{human}" if i == 0 else human})
        turns.append({"from": "gpt", "value": gpt})
    sample = tokenize_conversation(turns, tokenizer, TEMPLATE, 1, False, False)
    return [] if sample.mismatch else [(list(sample.input_ids), list(sample.labels))]


GROUPED_BATCHES = 8  # batches drawn at once and cut by length


def length_grouped_batches(rng: random.Random, draw: Callable[[], list], batch_size: int) -> Iterator[list]:
    """Batches of fresh samples (`draw()` returns one record's samples, in the form of that moment): drawn
    `GROUPED_BATCHES` batches at a time, sorted by length, cut into consecutive batches and shuffled, so
    that a batch pads to its own length (template records are 25-180 tokens; padding every batch to its
    longest sample cost ~40% of a step). Every sample is used once: a record's samples that overflow the
    group wait for the next one, drawn at random so that the longest are not the ones left over."""
    carry: list = []
    while True:
        pool = carry
        while len(pool) < GROUPED_BATCHES * batch_size:
            pool += draw()
        rng.shuffle(pool)
        pool, carry = pool[:GROUPED_BATCHES * batch_size], pool[GROUPED_BATCHES * batch_size:]
        pool.sort(key=lambda sample: len(sample[0]))
        batches = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(batches)
        yield from batches


def _held_out(tokenizer, spec: LLMPretrainSpec) -> dict[str, list[tuple[list[int], Any, str]]]:
    """Held-out questions drawn as the eval split's (balanced categories x difficulties) from a seed stream
    the training draws never use, as prompts in both forms: {"bare": ..., "template": ...} of (ids, qa,
    difficulty)."""
    from dpn.conversation import encode_prompt

    tests: dict[str, list[tuple[list[int], Any, str]]] = {"bare": [], "template": []}
    for scene, qa, difficulty in eval_items(random.Random(1_000_003 + spec.seed), spec.eval_questions):
        question = short_question(qa.question)
        tests["bare"].append((bare_sample(tokenizer, scene_text(scene), question), qa, difficulty))
        tests["template"].append((encode_prompt(f"{scene_text(scene)}\n{question}", tokenizer, TEMPLATE, 1, False,
                                                False), qa, difficulty))
    return tests


def _score(model, pad_id: int, items, first: dict[str, dict[str, int]]) -> dict[str, float]:
    """Accuracy (percent) over `items` overall, per category and per difficulty, scored by the answer's first
    token: the argmax over the category's answers (`first`: category -> answer -> first token id)."""
    import torch

    model.eval()
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for i in range(0, len(items), 50):
            chunk = items[i:i + 50]
            width = max(len(ids) for ids, _, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id)  # (B, T) left-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (x, _, _) in enumerate(chunk):
                ids[j, width - len(x):], mask[j, width - len(x):] = torch.tensor(x), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]  # (B, V): the answer's first token
            for j, (_, qa, difficulty) in enumerate(chunk):
                options = first[qa.category]
                ok = max(options, key=lambda a: float(logits[j, options[a]])) == qa.answer
                for key in ("all", qa.category, difficulty):
                    right.setdefault(key, []).append(ok)
    model.train()
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(right.items())}


def pretrain_llm(spec: LLMPretrainSpec, preset: str, tokenizer_dir: str | Path, out_dir: str | Path | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the LLM of `preset` (random, seeded) per `spec` with the tokenizer at `tokenizer_dir` (the
    corpus'); save it with that tokenizer to `out_dir` if given. `on_eval(row)` gets every evaluation row
    (step, held-out accuracy in both forms, per category in the template, loss, seconds). Returns the
    summary (last row, the step it stopped at, whether it reached the target, timing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpn.presets import get_preset
    from dpn.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = random_vocab_size(preset, tokenizer)
    if vocab != len(tokenizer):
        raise ValueError(f"tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, but a random {preset!r} LLM gets "
                         f"{vocab} embedding rows; stage 0's object tokens need rows past the tokenizer's last id")
    tokenizer.add_tokens(object_tokens())  # appended: the corpus' ids are unchanged
    torch.manual_seed(spec.seed)
    config = get_preset(preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).text_config
    config.initializer_range = spec.init_std
    model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)

    def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, T) right-padded
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    tests = _held_out(tokenizer, spec)
    first = {c: {a: tokenizer(f" {a}", add_special_tokens=False).input_ids[0] for a in answers}
             for c, answers in ANSWERS.items()}

    def score(items) -> dict[str, float]:
        return _score(model, tokenizer.pad_token_id, items, first)

    rng, rows, t0, step = random.Random(spec.seed), [], time.perf_counter(), 0
    # `step` is read when a group is drawn: the curriculum's form switches within GROUPED_BATCHES steps.
    batches = length_grouped_batches(
        rng, lambda: _samples(rng, tokenizer, step < spec.bare_steps or rng.random() < spec.bare_mix), spec.batch_size)
    reached = False
    model.train()
    while step < spec.steps and not reached:
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.steps, spec.warmup_ratio, spec.schedule)
        batch = collate(next(batches))
        loss = model(**batch).loss
        loss.backward()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % spec.eval_every == 0 or step == spec.steps:
            template = score(tests["template"])
            row = {"step": step, "accuracy_pct": template["all"], "bare_accuracy_pct": score(tests["bare"])["all"],
                   "per_category_pct": {c: template[c] for c in CATEGORIES},
                   "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            if on_eval is not None:
                on_eval(row)
            reached = step >= spec.bare_steps and template["all"] >= spec.target_accuracy_pct
    model.eval()
    if out_dir is not None:
        base = load_tokenizer(tokenizer_dir)
        model.resize_token_embeddings(len(base))  # object tokens dropped: the stage's vocabulary again
        model.save_pretrained(str(out_dir))
        base.save_pretrained(str(out_dir))
    return {**rows[-1], "evals": rows, "steps": step, "max_steps": spec.steps, "reached_target": reached,
            "target_accuracy_pct": spec.target_accuracy_pct,
            "seconds_per_step": round((time.perf_counter() - t0) / step, 4)}


def pretrain_llm_on_ray(spec: LLMPretrainSpec, preset: str, tokenizer_dir: str | Path, out_dir: str | Path
                        ) -> dict[str, Any]:
    """`pretrain_llm` as a one-CPU Ray task (`stage0.common.on_one_cpu`)."""
    return on_one_cpu(pretrain_llm, "stage0_llm", spec, preset, str(Path(tokenizer_dir).absolute()), str(Path(out_dir).absolute()))


__all__ = ["GROUPED_BATCHES", "bare_sample", "length_grouped_batches", "object_token", "object_tokens",
           "pretrain_llm", "pretrain_llm_on_ray", "scene_text"]
