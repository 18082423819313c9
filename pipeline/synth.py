"""The shapes benchmark: small synthetic images of coloured shapes with compositional captions.

Each image holds 1-3 non-overlapping shapes (6 colours, 5 shapes, 2 sizes) on
black; captions name the shapes and the relation of the first two ("a small red
circle left of a large blue square and a small green star"). The test split is
made of PAIRS that differ only by swapped colours or by the two related objects
swapping places, so both members have the same bag of words and only attribute
binding tells them apart: where a cross-attention teacher beats a dual encoder.

Everything is deterministic from the seed; the same config gives byte-identical
WebDataset shards (img2dataset layout: OUT/{train,val,test}/000000.tar with
KEY.jpg, KEY.txt, KEY.json). Run: `mcad data synth --out data/shapes`.
"""
from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from storage.atomic import atomic_write, atomic_write_json
from storage.errors import InputError

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
SPLITS = ("train", "val", "test")
# Fixed per-split key offsets: keys are unique over the benchmark and a split's
# keys do not move when another split's size changes.
KEY_OFFSETS = {"train": 0, "val": 100_000_000, "test": 200_000_000}
MAX_PER_SPLIT = 100_000_000
OBJECT_COUNTS = {1: 0.10, 2: 0.65, 3: 0.25}  # train/val; test draws 2 or 3 in the same ratio
N_CAPTIONS = 5  # exactly 5 per test image (COCO/Flickr protocol); up to 5 for train/val
MIN_IMAGE_SIZE = 24
JPEG_QUALITY = 95
SUPERSAMPLE = 4  # draw 4x larger and box-filter down: clean edges, still deterministic
GAP = 1.0  # pixels kept free between shapes and to the border
CONFIG_NAME = "synth_config.json"
FORMAT = "mcad-shapes-v1"
VOCABULARY = sorted(
    {"a", "the", "and", "of", "to"} | set(COLOURS) | set(SHAPES) | set(SIZES) | set(INVERSE)
)


@dataclass(frozen=True)
class SynthConfig:
    train: int = 10_000
    val: int = 500
    test: int = 500
    image_size: int = 48
    shard_size: int = 1000
    seed: int = 0
    # Share of train/val samples written as adjacent swap pairs (as in test): pools of
    # consecutive samples then hold the hard negatives a binding-aware teacher knows.
    train_pairs: float = 0.0

    def __post_init__(self):
        for name in ("train", "val", "test", "shard_size"):
            value = getattr(self, name)
            if value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
            if name != "shard_size" and value >= MAX_PER_SPLIT:
                raise InputError(f"--{name} must be below {MAX_PER_SPLIT:,} (9-digit keys), got {value}")
        if self.test % 2:
            raise InputError(f"--test must be even (the test split is made of pairs), got {self.test}")
        if not 0.0 <= self.train_pairs <= 1.0:
            raise InputError(f"--train-pairs must be within [0, 1], got {self.train_pairs}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise InputError(f"--image-size must be at least {MIN_IMAGE_SIZE} px to fit 3 shapes, "
                             f"got {self.image_size}")

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


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


def _object_count(rng: np.random.Generator, minimum: int) -> int:
    counts = [k for k in OBJECT_COUNTS if k >= minimum]
    p = np.array([OBJECT_COUNTS[k] for k in counts])
    return int(counts[rng.choice(len(counts), p=p / p.sum())])


def _swap_pair(rng: np.random.Generator, image_size: int) -> tuple[str, Scene, Scene] | None:
    """(kind, scene, its colour- or place-swapped partner), or None when the swap means the same."""
    kind = "colour" if rng.random() < 0.5 else "relation"
    first = make_scene(rng, image_size=image_size, n_objects=_object_count(rng, 2))
    second = SWAPS[kind](first)
    if second is None or canonical(second) == canonical(first):
        return None
    return kind, first, second


def _train_scenes(rng: np.random.Generator, n: int, image_size: int, pairs: float) -> Iterator[tuple[Scene, None]]:
    """Plain scenes; with pairs > 0, that share of the samples comes as adjacent swap pairs."""
    made = 0
    while made < n:
        if pairs > 0 and n - made >= 2 and rng.random() < pairs:  # no draw at all when pairs = 0
            while (pair := _swap_pair(rng, image_size)) is None:
                pass
            yield pair[1], None
            yield pair[2], None
            made += 2
        else:
            yield make_scene(rng, image_size=image_size, n_objects=_object_count(rng, 1)), None
            made += 1


def _test_pairs(rng: np.random.Generator, n: int, image_size: int) -> Iterator[tuple[Scene, dict]]:
    """n/2 swap pairs; no canonical scene occurs twice in the split (one right answer)."""
    seen: set[str] = set()
    misses = 0
    for pair_id in range(n // 2):
        while True:
            pair = _swap_pair(rng, image_size)
            meanings = {canonical(pair[1]), canonical(pair[2])} if pair else set()
            if pair and not meanings & seen:
                kind, first, second = pair
                break
            misses += 1
            if misses > 10_000 + 20 * n:
                raise InputError(f"--test {n}: cannot find that many distinct scene pairs; use a smaller --test")
        seen |= meanings
        yield first, {"id": pair_id, "variant": "a", "swap": kind}
        yield second, {"id": pair_id, "variant": "b", "swap": kind}


def _meta(scene: Scene, *, key: str, split: str, caps: list[str], pair: dict | None) -> dict:
    objs = scene.objects
    meta = {
        "key": key, "split": split, "captions": caps, "canonical": canonical(scene),
        "image_size": scene.image_size,
        "objects": [asdict(o) for o in objs],
        "relation": None if len(objs) < 2 else {"subject": 0, "object": 1, "relation": relation(objs[0], objs[1])},
    }
    if pair is not None:
        meta["pair"] = pair
    return meta


def _samples(split: str, cfg: SynthConfig) -> Iterator[dict]:
    """The split's WebDataset samples (key, jpg, txt, json as bytes), in key order."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    n = getattr(cfg, split)
    if split == "test":
        scenes = _test_pairs(rng, n, cfg.image_size)
    else:
        scenes = _train_scenes(rng, n, cfg.image_size, cfg.train_pairs)
    for index, (scene, pair) in enumerate(scenes):
        key = f"{KEY_OFFSETS[split] + index:09d}"
        caps = captions(scene, rng, N_CAPTIONS)
        buf = io.BytesIO()
        # 4:4:4 chroma keeps the colours of 5-pixel shapes; no optimize/EXIF: stable bytes.
        render(scene).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        meta = _meta(scene, key=key, split=split, caps=caps, pair=pair)
        yield {"__key__": key, "jpg": buf.getvalue(), "txt": caps[0].encode(),
               "json": json.dumps(meta, sort_keys=True).encode()}


def _write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds  # imports torch: only when shards are really written

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            # TarWriter is byte-stable given a fixed mtime: members sorted per sample, fixed mode/owner.
            sink = wds.TarWriter(fh, encoder=False, mtime=0, user="mcad", group="mcad", mode=0o444)
            for sample in samples:
                sink.write(sample)
            sink.close()

    atomic_write(path, write)


def _write_split(folder: Path, samples: Iterable[dict], shard_size: int,
                 on_sample: Callable[[], None] | None) -> list[Path]:
    paths = []
    samples = iter(samples)
    for index in itertools.count():
        chunk = []
        for sample in itertools.islice(samples, shard_size):
            chunk.append(sample)
            if on_sample:
                on_sample()
        if not chunk:
            return paths
        paths.append(folder / f"{index:06d}.tar")
        _write_shard(paths[-1], chunk)


def existing_shards(out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """The shards already under out_dir; refuses (InputError) if there are any, unless overwrite."""
    out = Path(out_dir)
    old = sorted(p for split in SPLITS for p in (out / split).glob("*.tar"))
    if old and not overwrite:
        raise InputError(f"{out} already holds {len(old)} shards; pass --overwrite to replace them")
    return old


def write_benchmark(cfg: SynthConfig, out_dir: str | Path, *, overwrite: bool = False,
                    on_sample: Callable[[], None] | None = None) -> dict:
    """Write the benchmark under out_dir/{train,val,test}/ and out_dir/synth_config.json.

    Refuses a folder that already holds shards unless overwrite (then only those
    shards and the config are removed). on_sample is called once per sample
    written (a progress bar). Returns the summary that is also the config JSON.
    """
    out = Path(out_dir)
    for path in existing_shards(out, overwrite=overwrite) + [out / CONFIG_NAME]:
        path.unlink(missing_ok=True)
    shards = {}
    for split in SPLITS:
        paths = _write_split(out / split, _samples(split, cfg), cfg.shard_size, on_sample)
        shards[split] = [str(p.relative_to(out)) for p in paths]
    summary = {
        "format": FORMAT, "config": asdict(cfg),
        "counts": {split: getattr(cfg, split) for split in SPLITS},
        "shards": shards, "key_offsets": KEY_OFFSETS, "captions_per_test_image": N_CAPTIONS,
        "vocabulary": VOCABULARY,
    }
    atomic_write_json(out / CONFIG_NAME, summary)  # written last: its presence means complete
    return summary
