"""`dpn synth`: determinism, LLaVA layouts, answers re-derived from the scenes and the pixels, difficulty
balance, safe writes, CLI."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.synth.corpus import SynthConfig, content_hash, generate_corpus
from pipelines.data.synth.questions import ANSWERS, CAPTION_INSTRUCTIONS, CATEGORIES, DIFFICULTIES, eval_plan
from pipelines.data.synth.rendering import pooled_cell_collisions
from pipelines.data.synth.scenes import COLORS, INSTRUCT_DIFFICULTY, LEVELS, Obj, Scene

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_pretrain=40, n_instruct=60, n_eval=45, vocab_size=512)
SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPE_WORDS = ("circle", "square", "triangle", "cross")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, seed=0, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- an independent reading of the templates: the answer each question must have on a scene --------


def _named(scene: dict, color: str, shape: str) -> dict:
    hits = [o for o in scene["objects"] if o["color"] == color and o["shape"] == shape]
    assert len(hits) == 1, f"'{color} {shape}' must name exactly one object, found {len(hits)}"
    return hits[0]


def _answer(question: str, scene: dict) -> str:
    objs = scene["objects"]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        hits = [o for o in objs if o["shape"] == m[1]]
        assert len(hits) == 1
        return hits[0]["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        hits = [o for o in objs if o["color"] == m[1]]
        assert len(hits) == 1
        return hits[0]["shape"]
    if question == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) to the left or to the right of the (\w+) (\w+)\?", question):
        a, b = _named(scene, m[1], m[2]), _named(scene, m[3], m[4])
        assert abs(a["x"] - b["x"]) >= 2 * abs(a["y"] - b["y"]), "horizontal question on a vertical pair"
        return "left" if a["x"] < b["x"] else "right"
    if m := re.fullmatch(r"Is the (\w+) (\w+) above or below the (\w+) (\w+)\?", question):
        a, b = _named(scene, m[1], m[2]), _named(scene, m[3], m[4])
        assert abs(a["y"] - b["y"]) >= 2 * abs(a["x"] - b["x"]), "vertical question on a horizontal pair"
        return "above" if a["y"] < b["y"] else "below"
    raise AssertionError(f"question outside the templates: {question!r}")


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        count += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def _check_pixels(path: Path, scene: dict) -> None:
    """The image shows the scene: every object's colour at its centre, and (PNG, exact colours) one
    connected blob per object of each colour, none of an absent colour."""
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (scene["width"], scene["height"])
    px = np.asarray(img).astype(int)
    lossless = path.suffix == ".png"
    for o in scene["objects"]:
        want = np.array(COLORS[o["color"]])
        got = px[o["y"], o["x"]]
        assert np.abs(got - want).max() <= (0 if lossless else 40), (path.name, o, got)
    if lossless:
        counts = Counter(o["color"] for o in scene["objects"])
        for name, rgb in COLORS.items():
            assert _components(np.all(px == np.array(rgb), axis=-1)) == counts[name], (path.name, name)


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    generate_corpus(again, seed=0, **SMALL)
    a, b = _files(corpus), _files(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.startswith("tokenizer/") for k in a) and any(k.endswith(".png") for k in a)

    other = tmp_path / "other"
    generate_corpus(other, seed=1, **SMALL)
    c = _files(other)
    for name in ("pretrain.json", "instruct.json", "eval/synthetic/questions.jsonl", "eval/synthetic/scenes.jsonl"):
        assert a[name] != c[name], name
    assert a["manifest.json"] != c["manifest.json"]


# ---- LLaVA layouts -------------------------------------------------------------------------------


def test_pretrain_records_follow_lcs558k(corpus):
    records = json.loads((corpus / "pretrain.json").read_text())
    assert isinstance(records, list) and len(records) == SMALL["n_pretrain"]
    scenes = {s["image"]: s for s in _jsonl(corpus / "scenes.jsonl")}
    placements = Counter()
    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        assert re.fullmatch(r"\d{9}", r["id"]) and r["image"] == f"pretrain/{r['id'][:5]}/{r['id']}{Path(r['image']).suffix}"
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1 and "<image>" not in gpt["value"]
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        placements["start" if human["value"].startswith("<image>") else "end"] += 1
        instruction = human["value"].replace("<image>", "").strip()
        assert instruction in CAPTION_INSTRUCTIONS
        # The caption lists every object: groups "<count> <size> <colour> <shape(s)>", sizes match the scene.
        scene = scenes[r["image"]]
        groups = re.findall(r"(a|two|three|four|five|six|seven|eight|nine|ten) (large|medium|small) (\w+) (\w+)", gpt["value"])
        words = {"a": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
        described = Counter()
        for count, size, color, shape in groups:
            singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
            assert (shape in singular) == (count != "a"), gpt["value"]
            described[(size, color, singular.get(shape, shape))] += words[count]
        assert described == Counter((o["size"], o["color"], o["shape"]) for o in scene["objects"]), gpt["value"]
        _check_pixels(corpus / "images" / r["image"], scene)
    assert placements["start"] > 0 and placements["end"] > 0


def test_instruct_records_follow_mix665k(corpus):
    records = json.loads((corpus / "instruct.json").read_text())
    assert isinstance(records, list) and len(records) == SMALL["n_instruct"]
    scenes = {s["image"]: s for s in _jsonl(corpus / "scenes.jsonl")}
    n_text = n_short = n_multi_turn = n_checked = 0
    answers = Counter()
    images_by_id: dict[str, set[str]] = {}
    for r in records:
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        n_multi_turn += len(turns) > 2
        if "image" not in r:
            n_text += 1
            assert set(r) == {"id", "conversations"}
            assert all("<image>" not in t["value"] for t in turns)
            continue
        assert set(r) == {"id", "image", "conversations"}
        images_by_id.setdefault(r["id"], set()).add(r["image"])
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert turns[0]["value"].startswith("<image>\n")
        scene = scenes[r["image"]]
        for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
            q = human["value"].removeprefix("<image>\n")
            if q.endswith(SUFFIX):
                n_short += 1
                expected = _answer(q.removesuffix(SUFFIX), scene)
                assert gpt["value"] == expected, (r["id"], q)
                answers[expected] += 1
                n_checked += 1
            elif q.endswith(MC_SUFFIX):
                body = q.removesuffix(MC_SUFFIX).split("\n")
                options = dict(line.split(". ", 1) for line in body[1:])
                assert sorted(options) == ["A", "B", "C", "D"]
                assert options[gpt["value"]] == _answer(body[0], scene)
                n_checked += 1
    assert n_text == round(0.1 * SMALL["n_instruct"])
    assert n_short > 0 and n_multi_turn > 0 and answers["yes"] > 0 and answers["no"] > 0
    # Ids repeat (one image, several records) exactly as often as the manifest says; each id keeps its image.
    ids = Counter(r["id"] for r in records if "image" in r)
    assert sum(k - 1 for k in ids.values()) == round(0.05 * SMALL["n_instruct"]) > 0
    assert all(len(v) == 1 for v in images_by_id.values())
    for rel in {r["image"] for r in records if "image" in r}:
        _check_pixels(corpus / "images" / rel, scenes[rel])
    assert n_checked > SMALL["n_instruct"] // 2
    # Instruct images are mostly easy (INSTRUCT_DIFFICULTY), each scene of one difficulty's size.
    sizes = Counter()
    for rel in set().union(*images_by_id.values()):
        (size,) = {o["size"] for o in scenes[rel]["objects"]}  # one size word per scene
        sizes[size] += 1
    levels = {lv.size: name for name, lv in LEVELS.items()}
    shares = {levels[k]: v / sum(sizes.values()) for k, v in sizes.items()}
    assert set(shares) == set(DIFFICULTIES)
    assert all(abs(shares[d] - w) < 0.15 for d, w in INSTRUCT_DIFFICULTY.items()), shares


def test_eval_layout_and_answers_match_the_drawn_scene(corpus):
    bench = corpus / "eval" / "synthetic"
    questions = _jsonl(bench / "questions.jsonl")
    truth = {t["question_id"]: t for t in _jsonl(bench / "ground_truth.jsonl")}
    scenes = {s["question_id"]: s for s in _jsonl(bench / "scenes.jsonl")}
    assert [q["question_id"] for q in questions] == list(range(SMALL["n_eval"])) == sorted(truth)
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category", "difficulty"}
        t = truth[q["question_id"]]
        assert set(t) == {"question_id", "answer", "category", "difficulty"}
        assert (t["category"], t["difficulty"]) == (q["category"], q["difficulty"])
        assert q["text"].endswith(SUFFIX) and "<image>" not in q["text"]
        scene = scenes[q["question_id"]]
        assert scene["image"] == q["image"]
        assert _answer(q["text"].removesuffix(SUFFIX), scene) == t["answer"]
        assert t["answer"] in ANSWERS[q["category"]]
        _check_pixels(bench / "images" / q["image"], scene)


def test_difficulty_axis_is_balanced_and_hard_means_small_and_many(corpus):
    questions = _jsonl(corpus / "eval" / "synthetic" / "questions.jsonl")
    scenes = {s["question_id"]: s for s in _jsonl(corpus / "eval" / "synthetic" / "scenes.jsonl")}
    truth = {t["question_id"]: t["answer"] for t in _jsonl(corpus / "eval" / "synthetic" / "ground_truth.jsonl")}
    # 45 questions over 5 categories x 3 difficulties: 3 in every cell.
    cells = Counter((q["category"], q["difficulty"]) for q in questions)
    assert cells == {(c, d): 3 for c in CATEGORIES for d in DIFFICULTIES}
    # Answers cycle inside each cell: no answer appears twice in a cell unless all were used.
    for (c, d) in cells:
        got = Counter(truth[q["question_id"]] for q in questions if (q["category"], q["difficulty"]) == (c, d))
        assert max(got.values()) - min(got.values()) <= 1 and len(got) == min(3, len(ANSWERS[c]))

    def width_at_48(o, s):  # object width once the canvas is padded to square and resized to 48 px
        return 2 * o["r"] * 48 / max(s["width"], s["height"])

    for q in questions:
        s = scenes[q["question_id"]]
        widths = [width_at_48(o, s) for o in s["objects"]]
        if q["difficulty"] == "easy":
            assert len(widths) <= 4 and min(widths) >= 11
            if q["category"] in ("color", "shape", "existence"):
                assert len(widths) == 1  # binding-free: the question is about the only object
        elif q["difficulty"] == "hard":
            assert len(widths) >= 7 and max(widths) <= 5.5
            if q["category"] == "position":
                # The two asked-about objects are adjacent: less than 2 px apart at 48 px.
                m = re.fullmatch(r"Is the (\w+) (\w+) .* the (\w+) (\w+)\?", q["text"].removesuffix(SUFFIX))
                a, b = _named(s, m[1], m[2]), _named(s, m[3], m[4])
                gap = max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) - a["r"] - b["r"]
                assert 0 < gap * 48 / max(s["width"], s["height"]) < 2
        else:
            assert 3 <= len(widths) <= 6 and 5.5 < min(widths) and max(widths) < 11


def test_hard_questions_need_more_visual_tokens_pooling_merges_their_objects(corpus):
    """The benchmark property routing relies on: after one (2, 2) expert (8-px cells at the tiny preset's
    48 px) about half of a hard scene's objects share a pooled token with another object, against few of
    an easy scene's; after two (16-px cells) most do. A model that reads pooled tokens there can no longer
    tell which colour goes with which shape."""
    questions = _jsonl(corpus / "eval" / "synthetic" / "questions.jsonl")
    scenes = {s["question_id"]: s for s in _jsonl(corpus / "eval" / "synthetic" / "scenes.jsonl")}

    def mean_collisions(level: str, cell_px: int) -> float:
        values = []
        for q in questions:
            if q["difficulty"] == level:
                d = scenes[q["question_id"]]
                scene = Scene(d["width"], d["height"], d["background"], [Obj(**o) for o in d["objects"]])
                values.append(pooled_cell_collisions(scene, 48, cell_px))
        return sum(values) / len(values)

    for cell in (8, 16):
        assert mean_collisions("easy", cell) < mean_collisions("medium", cell) < mean_collisions("hard", cell)
    assert mean_collisions("hard", 8) >= 0.35 and mean_collisions("easy", 8) <= 0.2
    assert mean_collisions("hard", 16) >= 0.6
    assert mean_collisions("hard", 4) <= 0.35  # at full resolution most hard objects still have own tokens
    # Hand-checked: two 4-px objects 6 px apart share an 8-px cell but not a 4-px patch.
    two = Scene(48, 48, "white", [Obj("circle", "red", "small", 1, 1, 1),
                                        Obj("square", "blue", "small", 6, 1, 1)])
    assert pooled_cell_collisions(two, 48, 8) == 1.0 and pooled_cell_collisions(two, 48, 4) == 0.0


def test_eval_plan_spreads_a_remainder_over_both_axes():
    plan = eval_plan(random.Random(0), 47)
    # 47 = 3 x 15 + 2: the two extra questions go to cells 0 (easy, color) and 1 (medium, shape).
    assert Counter(d for _, d, _ in plan) == {"easy": 16, "medium": 16, "hard": 15}
    assert Counter(c for c, _, _ in plan) == {"color": 10, "shape": 10, "count": 9, "position": 9, "existence": 9}


def test_manifest_counts_chance_and_hash(corpus):
    m = json.loads((corpus / "manifest.json").read_text())
    assert m["config"] == SynthConfig(seed=0, **SMALL).to_dict()
    assert m["content_sha256"] == content_hash(corpus)
    n_images = sum(1 for p in (corpus / "images").rglob("*") if p.is_file())
    assert m["counts"]["images"]["pretrain"] + m["counts"]["images"]["instruct"] == n_images
    assert m["counts"]["images"]["eval"] == SMALL["n_eval"]
    assert m["counts"]["eval_difficulty"] == {"easy": 15, "medium": 15, "hard": 15}
    chance = {c: v["chance"] for c, v in m["eval"]["categories"].items()}
    assert chance == {"color": 0.166667, "shape": 0.25, "count": 0.25, "position": 0.5, "existence": 0.5}
    # 9 questions per category: (1/6 + 1/4 + 1/4 + 1/2 + 1/2) / 5 = 1/3
    assert m["eval"]["uniform_chance"] == pytest.approx(1 / 3, abs=1e-6)
    assert sum(m["sizes"]["image_formats"].values()) == n_images + SMALL["n_eval"]
    assert len(m["sizes"]["image_sizes"]) > 1  # several sizes / aspect ratios


def test_tokenizer_is_saved_and_covers_the_corpus(corpus):
    from dpn.tokenizer import IMAGE_ID, load_tokenizer

    tok = load_tokenizer(corpus / "tokenizer")
    text = "<image>\nWhat color is the triangle?" + SUFFIX
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IMAGE_ID and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    # Trained on the templates: a whole question is a handful of tokens, not one per byte.
    assert len(ids) < len(text) // 3


# ---- safe writes ---------------------------------------------------------------------------------


def test_refuses_foreign_or_differently_configured_directories(corpus, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no dpn synth corpus"):
        generate_corpus(foreign, seed=0, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    before = _files(corpus)
    with pytest.raises(FileExistsError, match=r"another config .*'seed': \(0, 5\)"):
        generate_corpus(corpus, seed=5, **SMALL)
    assert _files(corpus) == before
    assert not [p for p in corpus.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_same_config_is_reused_and_a_damaged_corpus_is_regenerated(tmp_path):
    out = tmp_path / "c"
    first = generate_corpus(out, seed=2, **SMALL)
    assert first["reused"] is False
    again = generate_corpus(out, seed=2, **SMALL)
    assert again["reused"] is True and again["content_sha256"] == first["content_sha256"]
    (out / "pretrain.json").write_text("[]")
    repaired = generate_corpus(out, seed=2, **SMALL)
    assert repaired["reused"] is False and repaired["content_sha256"] == first["content_sha256"]
    assert len(json.loads((out / "pretrain.json").read_text())) == SMALL["n_pretrain"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    import dpn.tokenizer

    def broken(texts, vocab_size=2048):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(dpn.tokenizer, "train_tokenizer", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        generate_corpus(tmp_path / "c", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_eval=14), "n_eval"),
        (dict(n_pretrain=0), "n_pretrain"),
        (dict(n_instruct=True), "n_instruct"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(seed=-1), "seed"),
        (dict(png_fraction=1.5), "png_fraction"),
        (dict(text_only_fraction=0.5, duplicate_id_fraction=0.5), "text_only_fraction"),
    ],
)
def test_config_is_validated_eagerly(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_prints_the_summary_as_last_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "jobs.cli", "synth", "--out", str(out), "--seed", "7",
           "--pretrain", "6", "--instruct", "10", "--eval", "15", "--vocab-size", "400"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["pretrain"], summary["instruct"], summary["eval"]) == (6, 10, 15)
    assert summary["out_dir"] == str(out) and summary["seconds"] >= 0 and summary["reused"] is False
    # 10 instruct records: 1 text-only (10%), round(0.5) = 0 duplicates, so 9 instruct images; + 6 + 15.
    assert summary["instruct_text_only"] == 1 and summary["images"] == 6 + 9 + 15
    assert len(json.loads((out / "instruct.json").read_text())) == 10

    bad = subprocess.run(cmd[:-1] + ["100"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "vocab_size" in bad.stderr
