"""Scenes of the synthetic corpus: which objects (colour, shape, size) sit where on a canvas, drawn at
random for a difficulty level. Objects are placed by their boxes, never overlapping, with a level's
least gap; sizes are set relative to the canvas' long side, so their size after the resize to the tiny
preset's 48 px is known (`LEVELS`). `questions` builds scenes around a question, `rendering` draws them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Saturated colours, far apart in RGB and from every background, so a colour survives JPEG and the
# resize to 48 px even on a 4-px object.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36),
    "green": (30, 160, 60),
    "blue": (36, 80, 224),
    "yellow": (240, 204, 16),
    "purple": (140, 56, 192),
    "orange": (246, 128, 16),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (232, 232, 232),
    "cream": (246, 240, 226),
}
# (width, height): mostly square, some landscape/portrait, since processing pads to square first.
CANVASES = (
    (96, 96), (112, 112), (128, 128), (144, 144), (160, 160), (96, 96), (128, 128),
    (128, 96), (96, 128), (160, 112), (112, 160),
)


@dataclass(frozen=True)
class Level:
    size: str  # the size word used in captions
    radius: tuple[float, float]  # half-extent of an object, as a fraction of the canvas's long side
    count: tuple[int, int]  # objects per scene (inclusive)
    gap: float  # least free space between two objects' boxes, as a fraction of the long side


# At 48 px a long side S maps to 48 px: easy objects are 0.24-0.30 S = 11.5-14.4 px across, medium
# 6.2-7.7 px, hard 3.8-4.8 px (about one 4-px patch).
LEVELS: dict[str, Level] = {
    # One object: easy questions need no binding (which object is "the circle"), so they are what a
    # tiny model learns first (bench/RESULTS_learnability.md); count and position questions still place
    # the objects they ask about.
    "easy": Level(size="large", radius=(0.12, 0.15), count=(1, 1), gap=0.05),
    "medium": Level(size="medium", radius=(0.065, 0.08), count=(3, 5), gap=0.04),
    "hard": Level(size="small", radius=(0.04, 0.05), count=(7, 10), gap=0.025),
}
# Instruct images by difficulty: mostly easy, so that the skills a from-scratch tiny model learns first
# get most of the supervision (bench/RESULTS_learnability.md); the benchmark stays balanced.
INSTRUCT_DIFFICULTY: dict[str, float] = {"easy": 0.7, "medium": 0.2, "hard": 0.1}
# Pretrain (caption) scenes by level, "mixed" = large objects among small ones; mostly easy for the same
# reason.
PRETRAIN_LEVELS: dict[str, float] = {"easy": 0.7, "medium": 0.1, "hard": 0.1, "mixed": 0.1}
_MIN_RADIUS_PX = 4  # below this a triangle's tip or a cross's arms lose their shape in PNG/JPEG
_EDGE_MARGIN_PX = 2


@dataclass
class Obj:
    shape: str
    color: str
    size: str  # "large" | "medium" | "small"
    x: int = -1  # centre, image pixels
    y: int = -1
    r: int = 0  # half-extent: the shape fits in the box [x - r, x + r] x [y - r, y + r]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[Obj] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
        }


class PlacementFailed(Exception):
    """The canvas ran out of room for the requested objects; the caller draws a new canvas."""


def _new_canvas(rng: random.Random) -> Scene:
    width, height = rng.choice(CANVASES)
    return Scene(width=width, height=height, background=rng.choice(tuple(BACKGROUNDS)))


def object_radius(rng: random.Random, scene: Scene, level: str) -> int:
    lo, hi = LEVELS[level].radius
    return max(_MIN_RADIUS_PX, round(max(scene.width, scene.height) * rng.uniform(lo, hi)))


def min_gap(scene: Scene, level: str) -> int:
    return max(2, round(max(scene.width, scene.height) * LEVELS[level].gap))


def in_bounds(scene: Scene, x: int, y: int, r: int) -> bool:
    m = _EDGE_MARGIN_PX + r
    return m <= x <= scene.width - 1 - m and m <= y <= scene.height - 1 - m


def is_clear(scene: Scene, x: int, y: int, r: int, gap: int) -> bool:
    """True when the box of (x, y, r) keeps at least `gap` free pixels to every placed object's box."""
    for o in scene.objects:
        if o.x < 0:
            continue
        if max(abs(x - o.x), abs(y - o.y)) - (r + o.r) < gap:
            return False
    return True


def place(
    rng: random.Random, scene: Scene, obj: Obj, gap: int, ok: Callable[[int, int], bool] | None = None, tries: int = 300
) -> None:
    """Give `obj` (radius set) a random free position inside the canvas, satisfying `ok(x, y)`."""
    m = _EDGE_MARGIN_PX + obj.r
    if scene.width - 1 - 2 * m < 0 or scene.height - 1 - 2 * m < 0:
        raise PlacementFailed
    for _ in range(tries):
        x = rng.randint(m, scene.width - 1 - m)
        y = rng.randint(m, scene.height - 1 - m)
        if is_clear(scene, x, y, obj.r, gap) and (ok is None or ok(x, y)):
            obj.x, obj.y = x, y
            scene.objects.append(obj)
            return
    raise PlacementFailed


def with_retries(rng: random.Random, build: Callable[[Scene], T]) -> tuple[Scene, T]:
    """Run `build` on fresh canvases until the objects fit (a few retries at most in practice)."""
    for _ in range(100):
        scene = _new_canvas(rng)
        try:
            return scene, build(scene)
        except PlacementFailed:
            continue
    raise RuntimeError("could not place the objects of a scene in 100 canvases; the level geometry is inconsistent")


def add_objects(rng: random.Random, scene: Scene, level: str, combos: Iterable[tuple[str, str]]) -> None:
    gap = min_gap(scene, level)
    for color, shape in combos:
        place(rng, scene, Obj(shape=shape, color=color, size=LEVELS[level].size, r=object_radius(rng, scene, level)), gap)


def random_combos(
    rng: random.Random, n: int, colors: Iterable[str] = COLOR_NAMES, shapes: Iterable[str] = SHAPES,
    exclude: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    colors, shapes, exclude = tuple(colors), tuple(shapes), set(exclude)
    allowed = [(c, s) for c in colors for s in shapes if (c, s) not in exclude]
    return [rng.choice(allowed) for _ in range(n)]


def count_range(level: str) -> tuple[int, int]:
    return LEVELS[level].count


def random_scene(rng: random.Random, level: str) -> Scene:
    """A scene with no question attached; level "mixed" puts one or two large objects among small ones."""

    def build(scene: Scene) -> None:
        if level == "mixed":
            add_objects(rng, scene, "easy", random_combos(rng, rng.randint(1, 2)))
            add_objects(rng, scene, "hard", random_combos(rng, rng.randint(2, 4)))
        else:
            add_objects(rng, scene, level, random_combos(rng, rng.randint(*count_range(level))))

    return with_retries(rng, build)[0]


def draw_level(rng: random.Random, weights: dict[str, float]) -> str:
    """A level name drawn with the given weights (INSTRUCT_DIFFICULTY, PRETRAIN_LEVELS)."""
    return rng.choices(tuple(weights), tuple(weights.values()))[0]


def relation(a: Obj, b: Obj) -> str | None:
    """Where `a` lies relative to `b` when one axis clearly dominates, else None (ambiguous)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= a.r + b.r and abs(dy) * 2 <= abs(dx):
        return "left" if dx < 0 else "right"
    if abs(dy) >= a.r + b.r and abs(dx) * 2 <= abs(dy):
        return "above" if dy < 0 else "below"
    return None
