"""The shapes world: scenes of coloured shapes, their captions, meaning and image.

A scene holds 1-3 non-overlapping shapes (6 colours, 5 shapes, 2 sizes) on
black; its captions name the shapes and the relation of the first two ("a small
red circle left of a large blue square and a small green star"), in every
paraphrase; `canonical` is its meaning in one normal form (two scenes with the
same canonical string mean the same to every caption). `swap_colours` and
`swap_places` make the partner scenes the benchmark's test pairs are built from.
pipeline/shapes/synth.py draws scenes from a seed and writes them as WebDataset shards.

`render_photo` draws the same scene the way web photos load: a 4:3 frame
(width 4/3 of the scene's side) of smooth gradients and blobs in muted tones,
sensor-like noise over everything, the shapes in the middle square. Saved as
JPEG (quality 90) a 480 px scene makes a 640 x 480 image of about 40-120 KB,
which costs what a web photo costs to decode; the captions stay true.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 70), "blue": (50, 100, 245),
    "yellow": (240, 220, 40), "purple": (185, 70, 225), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.10, "large": 0.17}  # half-width of the shape's box, as a fraction of the image side
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PHRASES = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
           "above": ("above",), "below": ("below",)}
ARTICLES = ("a", "the", "")
SUPERSAMPLE = 4  # draw 4x larger and box-filter down: clean edges, still deterministic
GAP = 1.0  # pixels kept free between shapes and to the border
VOCABULARY = sorted(
    {"a", "the", "and", "of", "to"} | set(COLOURS) | set(SHAPES) | set(SIZES) | set(INVERSE)
)


@dataclass(frozen=True)
class Obj:
    """One shape; (x, y) is its centre in pixels of the scene's image."""
    colour: str
    shape: str
    size: str
    x: int
    y: int

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    @property
    def phrase(self) -> str:
        return " ".join(self.kind)


@dataclass(frozen=True)
class Scene:
    """objects[0] and objects[1] are the related pair; objects[2], if any, is only named."""
    objects: tuple[Obj, ...]
    image_size: int


def half_width(size: str, image_size: int) -> float:
    return SIZES[size] * image_size


def relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b, along the dominant axis (image y grows downwards)."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) > abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def is_valid(objects: tuple[Obj, ...], image_size: int) -> bool:
    """In bounds, boxes apart, distinct kinds, and a clear relation between the first two."""
    if len({o.kind for o in objects}) < len(objects):
        return False  # two identical shapes would make a caption ambiguous
    for o in objects:
        h = half_width(o.size, image_size)
        if min(o.x, o.y) - h < GAP or max(o.x, o.y) + h > image_size - GAP:
            return False
    for a, b in itertools.combinations(objects, 2):
        reach = half_width(a.size, image_size) + half_width(b.size, image_size) + GAP
        if abs(a.x - b.x) < reach and abs(a.y - b.y) < reach:
            return False
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        main, other = sorted((abs(a.x - b.x), abs(a.y - b.y)), reverse=True)
        reach = half_width(a.size, image_size) + half_width(b.size, image_size) + GAP
        # Separated along the main axis and at most ~27 degrees off it: one clear relation.
        return main >= reach and 2 * other <= main
    return True


def make_scene(rng: np.random.Generator, *, image_size: int, n_objects: int) -> Scene:
    """A random valid scene of n_objects shapes of distinct kinds (rejection sampling)."""
    kinds = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]
    for _ in range(10_000):
        picked = [kinds[i] for i in rng.choice(len(kinds), size=n_objects, replace=False)]
        objects = []
        for size, colour, shape in picked:
            h = half_width(size, image_size)
            lo, hi = math.ceil(h + GAP), math.floor(image_size - GAP - h)
            x, y = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            objects.append(Obj(colour, shape, size, x, y))
        if is_valid(tuple(objects), image_size):
            return Scene(tuple(objects), image_size)
    raise RuntimeError(f"could not place {n_objects} shapes in {image_size} px")  # a bug: size is checked


def swap_colours(scene: Scene) -> Scene | None:
    """The related pair exchange colours; None if that makes no valid, different scene."""
    a, b, *rest = scene.objects
    if a.colour == b.colour:
        return None
    objects = (replace(a, colour=b.colour), replace(b, colour=a.colour), *rest)
    return Scene(objects, scene.image_size) if is_valid(objects, scene.image_size) else None


def swap_places(scene: Scene) -> Scene | None:
    """The related pair exchange positions (the relation flips); None if that does not fit."""
    a, b, *rest = scene.objects
    objects = (replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y), *rest)
    return Scene(objects, scene.image_size) if is_valid(objects, scene.image_size) else None


SWAPS: dict[str, Callable[[Scene], Scene | None]] = {"colour": swap_colours, "relation": swap_places}


def _caption(first: Obj, phrase: str | None, second: Obj | None, extra: Obj | None, article: str) -> str:
    def np_(o: Obj) -> str:
        return f"{article} {o.phrase}".strip()

    words = [np_(first)]
    if second is not None:
        words += [phrase, np_(second)]
    if extra is not None:
        words += ["and", np_(extra)]
    return " ".join(words)


def caption_variants(scene: Scene) -> list[str]:
    """Every paraphrase of the scene: article, relation inverted or not, long/short phrase."""
    objs = scene.objects
    if len(objs) == 1:
        return sorted(_caption(objs[0], None, None, None, art) for art in ARTICLES)
    a, b = objs[0], objs[1]
    extra = objs[2] if len(objs) > 2 else None
    rel = relation(a, b)
    out = set()
    for art in ARTICLES:
        for first, r, second in ((a, rel, b), (b, INVERSE[rel], a)):
            for phrase in PHRASES[r]:
                out.add(_caption(first, phrase, second, extra, art))
    return sorted(out)


def canonical(scene: Scene) -> str:
    """The scene's meaning in one normal form: "X right of Y" becomes "Y left of X", etc.

    Positions beyond the stated relation do not count, so two scenes with the
    same canonical string mean the same thing to every caption.
    """
    objs = scene.objects
    if len(objs) == 1:
        return _caption(objs[0], None, None, None, "a")
    a, b = objs[0], objs[1]
    rel = relation(a, b)
    if rel in ("right", "below"):
        a, b, rel = b, a, INVERSE[rel]
    return _caption(a, PHRASES[rel][0], b, objs[2] if len(objs) > 2 else None, "a")


def captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """n distinct paraphrases in random order (fewer if the scene has fewer)."""
    variants = caption_variants(scene)
    return [variants[i] for i in rng.permutation(len(variants))[:n]]


def _polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    # star: 5 points, inner radius 0.45 of the outer one, first point up
    return [(cx + rad * math.sin(k * math.pi / 5), cy - rad * math.cos(k * math.pi / 5))
            for k, rad in zip(range(10), itertools.cycle((h, 0.45 * h)))]


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as an RGB image of size x size pixels (default: the scene's own size)."""
    size = size or scene.image_size
    scale = SUPERSAMPLE * size / scene.image_size
    img = Image.new("RGB", (size * SUPERSAMPLE,) * 2, (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, h = o.x * scale, o.y * scale, half_width(o.size, scene.image_size) * scale
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "square":
            s = 0.85 * h  # a full-box square looks larger than the other shapes
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, h), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


PHOTO_ASPECT = (4, 3)  # render_photo's frame: width / height
PHOTO_NOISE = (4.0, 12.0)  # per-image noise sigma (grey levels), drawn uniformly: sets the JPEG size


def photo_width(image_size: int) -> int:
    """render_photo's frame width for a scene side (its height)."""
    return image_size * PHOTO_ASPECT[0] // PHOTO_ASPECT[1]


def render_photo(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene in a photo-like frame of photo_width(side) x side pixels (module doc).

    The background is muted (grey with a tint, levels 15-125) so no shape's
    colour is lost in it; every draw comes from `rng`, so the same generator
    gives the same pixels.
    """
    h = scene.image_size
    w = photo_width(h)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, w / h, w, dtype=np.float32)[None, :, None]
    grey = rng.uniform(15.0, 95.0, size=2)
    tint = rng.uniform(-12.0, 12.0, size=(2, 3))
    start, end = (grey[i] + tint[i] for i in range(2))
    angle = rng.uniform(0.0, 2 * math.pi)
    t = np.clip((math.cos(angle) * x + math.sin(angle) * y) / (w / h), 0.0, 1.0)
    canvas = (start * (1 - t) + end * t).astype(np.float32)
    for _ in range(4):  # soft blobs: the low frequencies of a scene behind the shapes
        cx, cy, radius = rng.uniform(0.0, w / h), rng.uniform(0.0, 1.0), rng.uniform(0.08, 0.35)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius * radius))
        canvas += blob * (rng.uniform(-30.0, 30.0) + rng.uniform(-8.0, 8.0, size=3)).astype(np.float32)
    # On black, render() gives each shape's colour times its pixel coverage (antialiased edges); the
    # same scene in white gives the coverage itself.
    shapes = np.asarray(render(scene), dtype=np.float32)
    white = Scene(tuple(replace(o, colour="white") for o in scene.objects), h)
    coverage = np.asarray(render(white), dtype=np.float32)[..., :1] / COLOURS["white"][0]
    left = (w - h) // 2
    canvas[:, left:left + h] = canvas[:, left:left + h] * (1 - coverage) + shapes
    canvas += rng.normal(0.0, rng.uniform(*PHOTO_NOISE), size=canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
