"""Questions of the synthetic corpus and the text around them: five question builders (colour, shape,
count, position, existence), each drawing a scene in which a given answer is true; every question a scene
answers (for further turns); BLIP-style captions; LLaVA's turn layouts (short-answer VQA, multiple
choice, conversation, text-only ShareGPT-style records); and the balanced plan of the benchmark.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpn.constants import IMAGE_TOKEN
from pipelines.data.synth.scenes import (
    COLOR_NAMES,
    INSTRUCT_DIFFICULTY,
    LEVELS,
    PLURALS,
    SHAPES,
    Obj,
    PlacementFailed,
    Scene,
    add_objects,
    count_range,
    draw_level,
    in_bounds,
    is_clear,
    min_gap,
    object_radius,
    place,
    random_combos,
    relation,
    with_retries,
)

# LLaVA-1.5's prompts, verbatim: short-answer VQA (VQAv2/GQA/... in mix665K and the eval sets) and
# multiple choice (A-OKVQA in mix665K).
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
# Brief-caption instructions in the spirit of LCS-558K's (a short imperative, the caption as answer).
CAPTION_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
NUMBER_WORDS = ("zero", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CATEGORIES = ("color", "shape", "count", "position", "existence")
DIFFICULTIES = ("easy", "medium", "hard")
# The answer set of each eval category; a uniform guess scores 1/len on a question (position and
# existence questions are binary even though position uses four answer words).
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": ("1", "2", "3", "4"),
    "position": ("left", "right", "above", "below"),
    "existence": ("yes", "no"),
}
CHANCE: dict[str, float] = {
    "color": 1 / len(COLOR_NAMES),
    "shape": 1 / len(SHAPES),
    "count": 1 / 4,
    "position": 1 / 2,
    "existence": 1 / 2,
}


@dataclass(frozen=True)
class QA:
    category: str
    question: str
    answer: str  # the short answer (eval ground truth, VQA-style records)
    sentence: str  # the same answer as a sentence (conversation-style records)


# --- the five question builders: each draws a scene in which `answer` is the true answer -------------


def _add_with_others(rng: random.Random, scene: Scene, level: str, target: tuple[str, str], **others: Any) -> None:
    """Place `target` (colour, shape) among random other objects drawn by `random_combos(**others)`."""
    n = rng.randint(*count_range(level))
    combos = [target] + random_combos(rng, n - 1, **others)
    rng.shuffle(combos)
    add_objects(rng, scene, level, combos)


def _build_color(rng: random.Random, scene: Scene, level: str, answer: str) -> QA:
    # The target is the only object of its shape; the others may share its colour (no shortcut).
    shape = rng.choice(SHAPES)
    _add_with_others(rng, scene, level, (answer, shape), shapes=[s for s in SHAPES if s != shape])
    return QA("color", f"What color is the {shape}?", answer, f"The {shape} is {answer}.")


def _build_shape(rng: random.Random, scene: Scene, level: str, answer: str) -> QA:
    # The target is the only object of its colour; the others may share its shape.
    color = rng.choice(COLOR_NAMES)
    _add_with_others(rng, scene, level, (color, answer), colors=[c for c in COLOR_NAMES if c != color])
    return QA("shape", f"What shape is the {color} object?", answer, f"The {color} object is a {answer}.")


def _build_count(rng: random.Random, scene: Scene, level: str, answer: str) -> QA:
    k = int(answer)
    if level == "easy":
        # Few large objects: count them all.
        add_objects(rng, scene, level, random_combos(rng, k))
        noun = "shape" if k == 1 else "shapes"
        sentence = f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} {noun}."
        return QA("count", "How many shapes are there?", answer, sentence)
    color = rng.choice(COLOR_NAMES)
    lo, hi = count_range(level)
    n = rng.randint(max(lo, k + 1), max(hi, k + 1))
    combos = random_combos(rng, k, colors=[color]) + random_combos(
        rng, n - k, colors=[c for c in COLOR_NAMES if c != color]
    )
    rng.shuffle(combos)
    add_objects(rng, scene, level, combos)
    noun = "shape" if k == 1 else "shapes"
    sentence = f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} {color} {noun}."
    return QA("count", f"How many {color} shapes are there?", answer, sentence)


_RELATION_WORDS = {
    "left": ("to the left or to the right of", "to the left of"),
    "right": ("to the left or to the right of", "to the right of"),
    "above": ("above or below", "above"),
    "below": ("above or below", "below"),
}


def _position_question(a: Obj, b: Obj, answer: str) -> QA:
    ask, say = _RELATION_WORDS[answer]
    return QA(
        "position", f"Is the {a.name} {ask} the {b.name}?", answer, f"The {a.name} is {say} the {b.name}."
    )


def _build_position(rng: random.Random, scene: Scene, level: str, answer: str) -> QA:
    # Two objects with unique (colour, shape) names; no other object shares either name.
    (ca, sa), (cb, sb) = rng.sample([(c, s) for c in COLOR_NAMES for s in SHAPES], 2)
    size = LEVELS[level].size
    a = Obj(shape=sa, color=ca, size=size, r=object_radius(rng, scene, level))
    b = Obj(shape=sb, color=cb, size=size, r=object_radius(rng, scene, level))
    gap = min_gap(scene, level)
    horizontal = answer in ("left", "right")
    sign = -1 if answer in ("left", "above") else 1  # sign of (a - b) along the asked axis
    if level == "hard":
        # Adjacent small objects: a gap of 0.02-0.035 of the long side (1-1.7 px at 48 px), so both
        # usually fall in one 8-px cell once the visual tokens are pooled 2 x 2.
        place(rng, scene, a, gap)
        near = max(2, round(max(scene.width, scene.height) * rng.uniform(0.02, 0.035)))
        for _ in range(50):
            along = -sign * (a.r + b.r + near)
            across = round(rng.uniform(-0.3, 0.3) * min(a.r, b.r))
            x, y = (a.x + along, a.y + across) if horizontal else (a.x + across, a.y + along)
            if in_bounds(scene, x, y, b.r) and is_clear(scene, x, y, b.r, 0):
                b.x, b.y = x, y
                scene.objects.append(b)
                break
        else:
            raise PlacementFailed
    else:
        place(rng, scene, b, gap)

        def ok(x: int, y: int) -> bool:
            a.x, a.y = x, y
            return relation(a, b) == answer

        place(rng, scene, a, gap, ok=ok)
    lo, hi = count_range(level)
    n_other = max(0, rng.randint(max(lo, 2), max(hi, 2)) - 2)
    add_objects(rng, scene, level, random_combos(rng, n_other, exclude=[(ca, sa), (cb, sb)]))
    assert relation(a, b) == answer
    return _position_question(a, b, answer)


def _build_existence(rng: random.Random, scene: Scene, level: str, answer: str) -> QA:
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    lo, hi = count_range(level)
    combos: list[tuple[str, str]] = []
    if answer == "yes":
        combos.append((color, shape))
    if level != "easy":
        # Distractors sharing the colour or the shape: the question needs binding, not a colour check.
        combos.append((color, rng.choice([s for s in SHAPES if s != shape])))
        combos.append((rng.choice([c for c in COLOR_NAMES if c != color]), shape))
    n = rng.randint(max(lo, len(combos)), max(hi, len(combos)))
    combos += random_combos(rng, n - len(combos), exclude=[(color, shape)])
    rng.shuffle(combos)
    add_objects(rng, scene, level, combos)
    sentence = f"Yes, there is a {color} {shape}." if answer == "yes" else f"No, there is no {color} {shape}."
    return QA("existence", f"Is there a {color} {shape} in the image?", answer, sentence)


_BUILDERS: dict[str, Callable[[random.Random, Scene, str, str], QA]] = {
    "color": _build_color,
    "shape": _build_shape,
    "count": _build_count,
    "position": _build_position,
    "existence": _build_existence,
}


def build_item(rng: random.Random, category: str, difficulty: str, answer: str) -> tuple[Scene, QA]:
    """A scene plus one question of `category` whose true answer is `answer`, at `difficulty`."""
    if answer not in ANSWERS[category]:
        raise ValueError(f"answer {answer!r} is not valid for category {category!r}; valid: {ANSWERS[category]}")
    scene, qa = with_retries(rng, lambda s: _BUILDERS[category](rng, s, difficulty, answer))
    assert qa is not None
    return scene, qa


def derive_questions(scene: Scene) -> list[QA]:
    """Every templated question the scene answers unambiguously (for extra turns of instruct records)."""
    objs = scene.objects
    shape_counts = Counter(o.shape for o in objs)
    color_counts = Counter(o.color for o in objs)
    name_counts = Counter(o.name for o in objs)
    out: list[QA] = []
    for o in objs:
        if shape_counts[o.shape] == 1:
            out.append(QA("color", f"What color is the {o.shape}?", o.color, f"The {o.shape} is {o.color}."))
        if color_counts[o.color] == 1:
            out.append(QA("shape", f"What shape is the {o.color} object?", o.shape, f"The {o.color} object is a {o.shape}."))
    n = len(objs)
    out.append(QA("count", "How many shapes are there?", str(n),
                  f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}."))
    for color, k in sorted(color_counts.items()):
        out.append(QA("count", f"How many {color} shapes are there?", str(k),
                      f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} {color} {'shape' if k == 1 else 'shapes'}."))
    for color in COLOR_NAMES:
        for shape in SHAPES:
            present = name_counts[f"{color} {shape}"] > 0
            out.append(QA(
                "existence", f"Is there a {color} {shape} in the image?", "yes" if present else "no",
                f"Yes, there is a {color} {shape}." if present else f"No, there is no {color} {shape}.",
            ))
    unique = [o for o in objs if name_counts[o.name] == 1]
    for a in unique:
        for b in unique:
            if a is not b and (rel := relation(a, b)) is not None:
                out.append(_position_question(a, b, rel))
    return out


def caption(scene: Scene) -> str:
    """A BLIP-style lower-case caption: groups of (size, colour, shape), listed left to right."""
    groups: dict[tuple[str, str, str], list[Obj]] = {}
    for o in sorted(scene.objects, key=lambda o: (o.x, o.y)):
        groups.setdefault((o.size, o.color, o.shape), []).append(o)
    parts = []
    for (size, color, shape), members in groups.items():
        k = len(members)
        parts.append(f"{NUMBER_WORDS[k]} {size} {color} {shape if k == 1 else PLURALS[shape]}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def short_question(q: str) -> str:
    """A question with LLaVA's short-answer instruction appended (VQA records, the eval split)."""
    return f"{q}\n{SHORT_ANSWER_PROMPT}"


def turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (human, gpt) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{human}" if i == 0 else human})
        turns.append({"from": "gpt", "value": gpt})
    return turns


def extra_questions(rng: random.Random, scene: Scene, first: QA, k: int) -> list[QA]:
    """Up to `k` further questions on `scene`: a category first (uniformly), then a question of it, so the
    many position pairs and 24 existence combos of a busy scene do not crowd out the rest."""
    by_category: dict[str, list[QA]] = {}
    for qa in derive_questions(scene):
        if qa.question != first.question:
            by_category.setdefault(qa.category, []).append(qa)
    if "existence" in by_category:
        # Keep yes/no balanced: as many absent combos as present ones.
        yes = [qa for qa in by_category["existence"] if qa.answer == "yes"]
        no = [qa for qa in by_category["existence"] if qa.answer == "no"]
        by_category["existence"] = yes + rng.sample(no, min(len(no), max(1, len(yes))))
    picked: list[QA] = []
    while len(picked) < k and by_category:
        category = rng.choice(sorted(by_category))
        options = by_category[category]
        picked.append(options.pop(rng.randrange(len(options))))
        if not options:
            del by_category[category]
    return picked


def _vqa_pairs(rng: random.Random, scene: Scene, first: QA) -> list[tuple[str, str]]:
    qas = [first] + extra_questions(rng, scene, first, rng.randint(0, 3))
    return [(short_question(qa.question), qa.answer) for qa in qas]


def _conversation_pairs(rng: random.Random, scene: Scene, first: QA) -> list[tuple[str, str]]:
    qas = [first] + extra_questions(rng, scene, first, rng.randint(0, 2))
    pairs = [(qa.question, qa.sentence) for qa in qas]
    if rng.random() < 0.5:
        pairs.insert(rng.randint(0, len(pairs)), ("Describe the image briefly.", f"The image shows {caption(scene)}."))
    return pairs


def _multiple_choice_pairs(rng: random.Random, qa: QA) -> list[tuple[str, str]]:
    universe = COLOR_NAMES if qa.category == "color" else SHAPES
    options = [qa.answer] + rng.sample([v for v in universe if v != qa.answer], 3)
    rng.shuffle(options)
    letters = "ABCD"
    lines = "\n".join(f"{letters[i]}. {v}" for i, v in enumerate(options))
    return [(f"{qa.question}\n{lines}\n{MULTIPLE_CHOICE_PROMPT}", letters[options.index(qa.answer)])]


_MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple"}
_SIDES = {"triangle": 3, "square": 4}


def instruct_pairs(rng: random.Random, scene: Scene, qa: QA) -> list[tuple[str, str]]:
    """The (human, gpt) turns of an instruct record around `qa` (its first question), in the corpus' style
    mix: multiple choice (colour / shape only), VQA short answers, or a conversation with sentences."""
    style = rng.random()
    if style < 0.1 and qa.category in ("color", "shape"):
        return _multiple_choice_pairs(rng, qa)
    if style < 0.7:
        return _vqa_pairs(rng, scene, qa)
    return _conversation_pairs(rng, scene, qa)


def draw_instruct_item(rng: random.Random) -> tuple[Scene, list[tuple[str, str]]]:
    """A fresh scene and its instruct turns, drawn as `instruct.json`'s image records are (category,
    difficulty mix, style mix), without rendering: for training on scenes given as text."""
    category = rng.choice(CATEGORIES)
    scene, qa = build_item(rng, category, draw_level(rng, INSTRUCT_DIFFICULTY), rng.choice(ANSWERS[category]))
    return scene, instruct_pairs(rng, scene, qa)


def eval_items(rng: random.Random, n: int) -> list[tuple[Scene, QA, str]]:
    """`n` (scene, question, difficulty) drawn as the eval split's (balanced categories x difficulties and
    answers), without rendering; the question text is `short_question(qa.question)`."""
    return [(*build_item(rng, c, d, a), d) for c, d, a in eval_plan(rng, n)]


def _text_only_qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == 2:
        shape = rng.choice(tuple(_SIDES))
        return f"How many sides does a {shape} have?", str(_SIDES[shape])
    if kind == 3:
        (x, y), result = rng.choice(tuple(_MIXES.items()))
        if rng.random() < 0.5:
            x, y = y, x
        return f"What color do you get when you mix {x} and {y}?", result
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    asked = rng.choice(("color", "shape"))
    first, second = (color, shape) if rng.random() < 0.5 else (shape, color)
    return f"Which of these is a {asked}: {first} or {second}?", color if asked == "color" else shape


def text_only_record(rng: random.Random) -> dict[str, Any]:
    # ShareGPT-style id: 7 random characters and a turn-group suffix.
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    rid = "".join(rng.choice(alphabet) for _ in range(7)) + "_0"
    short = rng.random() < 0.5
    turns = []
    for _ in range(rng.randint(1, 3)):
        q, a = _text_only_qa(rng)
        turns.append({"from": "human", "value": short_question(q) if short else q})
        turns.append({"from": "gpt", "value": a})
    return {"id": rid, "conversations": turns}


def eval_plan(rng: random.Random, n_eval: int) -> list[tuple[str, str, str]]:
    """(category, difficulty, answer) for every eval question: cells of category x difficulty differ in
    size by at most one, and answers cycle within each cell so they are balanced to +-1."""
    # Cell i is (DIFFICULTIES[i % 3], CATEGORIES[i % 5]): the 15 indices cover each pair once (3 and 5 are
    # coprime), so a remainder of n_eval % 15 spreads over both axes instead of piling onto one.
    n_cells = len(CATEGORIES) * len(DIFFICULTIES)
    plan = []
    for i in range(n_cells):
        category, difficulty = CATEGORIES[i % len(CATEGORIES)], DIFFICULTIES[i % len(DIFFICULTIES)]
        size = n_eval // n_cells + (1 if i < n_eval % n_cells else 0)
        answers = list(ANSWERS[category])
        rng.shuffle(answers)
        plan += [(category, difficulty, answers[j % len(answers)]) for j in range(size)]
    rng.shuffle(plan)
    return plan
