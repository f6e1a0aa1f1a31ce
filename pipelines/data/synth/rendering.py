"""Drawing the synthetic corpus' scenes: pixels exactly as the scene says (no anti-aliasing), PNG or JPEG
bytes, and the geometry checks that read the drawing back (which object covers a point; which objects
share a pooled cell once the image is resized as the model sees it).
"""

from __future__ import annotations

import io

from pipelines.data.synth.scenes import BACKGROUNDS, COLORS, SHAPES, Obj, Scene


def render(scene: Scene):  # -> PIL.Image.Image
    """Draw the scene without anti-aliasing: every object pixel has exactly its colour (in PNG)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        rgb = COLORS[o.color]
        x, y, r = o.x, o.y, o.r
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        elif o.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
        elif o.shape == "triangle":
            draw.polygon(((x, y - r), (x - r, y + r), (x + r, y + r)), fill=rgb)
        elif o.shape == "cross":
            h = max(1, round(r * 0.35))  # arm half-thickness
            draw.rectangle((x - r, y - h, x + r, y + h), fill=rgb)
            draw.rectangle((x - h, y - r, x + h, y + r), fill=rgb)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; valid: {SHAPES}")
    return image


def covers(o: Obj, x: float, y: float) -> bool:
    """Whether point (x, y) of the canvas lies on object `o` as `render` draws it."""
    dx, dy = x - o.x, y - o.y
    if o.shape == "circle":
        return dx * dx + dy * dy <= o.r * o.r
    if o.shape == "square":
        return abs(dx) <= o.r and abs(dy) <= o.r
    if o.shape == "triangle":  # apex (x, y - r), base y + r: half-width grows from 0 to r downwards
        return -o.r <= dy <= o.r and abs(dx) <= (dy + o.r) / 2
    h = max(1, round(o.r * 0.35))  # cross
    return (abs(dx) <= o.r and abs(dy) <= h) or (abs(dx) <= h and abs(dy) <= o.r)


def pooled_cell_collisions(scene: Scene, image_size: int = 48, cell_px: int = 8) -> float:
    """Share of the scene's objects that overlap a pooled cell holding another object, once the image is
    padded to a square (centred, as LLaVA's `expand2square`) and resized to `image_size`, with cells of
    `cell_px` pixels: 4 = the tiny preset's 4-px patches, 8 = after one (2, 2) expert, 16 = after two.
    Why it matters: a max-pooled cell mixes every object in it, so from then on the LLM reads one token
    for two objects -- which colour belongs to which shape, how many there are. The "hard" level is built
    so this happens to about half its objects after a single (2, 2) expert (tests/test_synth.py), which is
    what makes its questions need more visual tokens than "easy" ones."""
    side = max(scene.width, scene.height)
    scale = image_size / side
    off_x, off_y = (side - scene.width) / 2, (side - scene.height) / 2
    covered = []
    for o in scene.objects:
        x, y, r = (o.x + off_x) * scale, (o.y + off_y) * scale, o.r * scale
        covered.append({(cx, cy) for cx in range(int((x - r) // cell_px), int((x + r) // cell_px) + 1)
                        for cy in range(int((y - r) // cell_px), int((y + r) // cell_px) + 1)})
    if not covered:
        return 0.0
    shared = sum(1 for i, c in enumerate(covered) if any(c & d for j, d in enumerate(covered) if j != i))
    return shared / len(covered)


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        # 4:4:4 chroma: default 4:2:0 would smear the colour of a 4-px object into its neighbours.
        image.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()
