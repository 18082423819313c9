"""Views of a sample: random resized crops of its decoded image, recorded as boxes (docs/design.md, section 4).

View 0 is the whole image. View v >= 1 is a crop drawn like torchvision's
RandomResizedCrop (an area share in `crop_scale`, an aspect ratio in
`crop_ratio`, log-uniform) from a generator keyed by (seed, shard, row, view),
so any worker and any resume draws the same box. What the store keeps is the
box, normalised (x0, y0, x1, y1) float32; the box is the truth, not the seed.

`apply_box` is the one re-application rule, shared by the teacher pass and the
student: image + box -> the view's pixels, before any model's processor.
`view_signals` runs the teachers on a pool's views for the pass (the view table's
columns; pipeline/signals.py calls it pool by pool).

    cfg = ViewConfig(n=4, m=2, seed=0)
    boxes = cfg.boxes("000012", rows=range(256), sizes=[im.size for im in images])   # (256, 3, 4)
    crop = apply_box(image, boxes[i, v - 1])                                       # a PIL image
    check_recipe(store.views)      # a student refuses pixels it cannot reproduce
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import PIL
import torch
from PIL import Image

from mcad.storage.errors import InputError
from mcad.storage.schema import BOX, DIRECTIONS, FUSED_PROJ, IDX, IMG_EMB, ITM, ITM_POS, KEY, PAD_IDX, ROW, VIEW, col
from mcad.storage.manifest import (
    VIEW_CROP_RATIO, VIEW_CROP_SCALE, VIEW_M, VIEW_N, VIEW_PILLOW, VIEW_RULE, VIEW_SEED, VIEW_TORCHVISION,
)
from mcad.storage.views import stable_id

# The re-application rule's version: bump it whenever apply_box's pixels could change.
# Rule 1: pixel edges = floor(coordinate x size + 0.5), at least one pixel wide, clipped to the
# image; the crop is resized back to the image's own size with Pillow's bicubic filter; a box
# covering the whole image returns the image itself (view 0's pixels are untouched).
RULE_VERSION = 1
KNOWN_RULES = (1,)
RESAMPLE = Image.Resampling.BICUBIC
_TRIES = 10  # draws before the central-crop fallback (as torchvision)


@dataclass(frozen=True)
class ViewConfig:
    """How many views a pass makes and how their boxes are drawn; pinned in the manifest (`recipe`)."""

    n: int = 1                                      # views per sample, view 0 (the whole image) included
    m: int = 1                                      # views the single teacher scores (the first m)
    crop_scale: tuple[float, float] = (0.5, 1.0)    # share of the image's area a crop covers
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # a crop's width / height
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "crop_scale", _pair(self.crop_scale, "crop scale"))
        object.__setattr__(self, "crop_ratio", _pair(self.crop_ratio, "crop ratio"))
        if self.n < 1:
            raise InputError(f"views must be at least 1, got {self.n}")
        if not 1 <= self.m <= self.n:
            raise InputError(f"single views must be between 1 and the views ({self.n}), got {self.m}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop scale must satisfy 0 < LO <= HI <= 1, got {lo},{hi}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise InputError(f"crop ratio must satisfy 0 < LO <= HI, got {lo},{hi}")
        if not 0 <= self.seed < 2 ** 63:
            raise InputError(f"seed must be a non-negative integer below 2**63, got {self.seed}")

    def recipe(self) -> dict[str, Any]:
        """What the manifest pins: N, M, the crop ranges, the seed, the rule and the pixel makers' versions."""
        return {VIEW_N: self.n, VIEW_M: self.m, VIEW_CROP_SCALE: list(self.crop_scale),
                VIEW_CROP_RATIO: list(self.crop_ratio), VIEW_SEED: self.seed, VIEW_RULE: RULE_VERSION,
                VIEW_PILLOW: PIL.__version__, VIEW_TORCHVISION: None}  # None: the rule does not use torchvision

    def boxes(self, shard: str, rows: Iterable[int], sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(len(rows), n - 1, 4) float32 boxes of views 1..n-1 of the given shard rows, images of (width, height)."""
        rows = list(rows)
        if len(rows) != len(sizes):
            raise ValueError(f"{len(rows)} rows but {len(sizes)} image sizes")
        out = np.zeros((len(rows), self.n - 1, 4), np.float32)
        for i, (row, (width, height)) in enumerate(zip(rows, sizes)):
            for v in range(1, self.n):
                out[i, v - 1] = draw_box(view_rng(self.seed, shard, row, v), width, height,
                                         scale=self.crop_scale, ratio=self.crop_ratio)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pair(value, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be two numbers LO,HI, got {value!r}") from None
    return lo, hi


def view_rng(seed: int, shard: str, row: int, view: int) -> np.random.Generator:
    """The generator of one box: keyed by (seed, shard name, row, view) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), stable_id(shard), int(row), int(view)]))


def draw_box(rng: np.random.Generator, width: int, height: int, *, scale: tuple[float, float],
             ratio: tuple[float, float]) -> np.ndarray:
    """A random resized crop of a width x height image as a normalised float32 box (x0, y0, x1, y1).

    torchvision's RandomResizedCrop.get_params, with numpy: up to 10 draws of an
    area share and a log-uniform aspect ratio; a crop that does not fit falls back
    to the largest central crop within the ratio range. Edges are whole pixels.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _normalised(left, top, w, h, width, height)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return _normalised((width - w) // 2, (height - h) // 2, w, h, width, height)


def _normalised(left: int, top: int, w: int, h: int, width: int, height: int) -> np.ndarray:
    return np.array([left / width, top / height, (left + w) / width, (top + h) / height], np.float32)


def check_box(box, where: str = "box") -> tuple[float, float, float, float]:
    """A box as four floats; InputError unless 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    values = tuple(float(x) for x in np.asarray(box, dtype=np.float64).reshape(-1))
    if len(values) != 4:
        raise InputError(f"{where}: a box has 4 coordinates, got {len(values)}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(f"{where}: {values} is not a box inside [0, 1] (x0 < x1, y0 < y1)")
    return values


def pixel_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The box's pixel edges (left, top, right, bottom) in a width x height image (rule 1)."""
    x0, y0, x1, y1 = check_box(box)

    def edges(lo: float, hi: float, size: int) -> tuple[int, int]:
        a = min(max(math.floor(lo * size + 0.5), 0), size - 1)
        b = min(max(math.floor(hi * size + 0.5), a + 1), size)
        return a, b

    left, right = edges(x0, x1, width)
    top, bottom = edges(y0, y1, height)
    return left, top, right, bottom


def apply_box(image: Image.Image, box) -> Image.Image:
    """The view's pixels: `image` cropped to `box` and resized back to its own size (rule RULE_VERSION).

    A box covering every pixel returns `image` itself, so view 0 is the decoded image, unchanged.
    """
    width, height = image.size
    edges = pixel_box(box, width, height)
    if edges == (0, 0, width, height):
        return image
    return image.crop(edges).resize((width, height), RESAMPLE)


def crop_sample(sample, box):
    """A sample (any dataclass with `.image`) with its image replaced by the view `box` gives."""
    return dataclasses.replace(sample, image=apply_box(sample.image, box))


def check_recipe(recipe: dict[str, Any] | None, where: str = "store") -> None:
    """Refuse, in one line naming the difference, a view recipe whose pixels this environment cannot remake.

    None (a store without views) needs nothing. The rule must be one this mcad
    knows, and Pillow (and torchvision, when the recipe used it) the same version.
    """
    if not recipe:
        return
    fix = "install the versions the pass used, or train with --views canonical (view 0 only)"
    rule = recipe.get(VIEW_RULE)
    if rule not in KNOWN_RULES:
        raise InputError(f"{where}: its views were cut with box rule {rule!r}, this mcad knows rule(s) "
                         f"{', '.join(map(str, KNOWN_RULES))}; {fix}")
    if recipe.get(VIEW_PILLOW) != PIL.__version__:
        raise InputError(f"{where}: its views were cut with Pillow {recipe.get(VIEW_PILLOW)}, this environment "
                         f"has Pillow {PIL.__version__}; {fix}")
    wanted = recipe.get(VIEW_TORCHVISION)
    if wanted is not None:
        try:
            import torchvision
            have = torchvision.__version__
        except Exception:  # noqa: BLE001 - any failed import means it cannot remake the pixels
            have = None
        if have != wanted:
            raise InputError(f"{where}: its views were made with torchvision {wanted}, this environment has "
                             f"{have or 'none importable'}; {fix}")


# ------------------------------------------------ the teachers on the views (the pass)

def view_signals(dual, single, samples: Sequence, columns: dict[str, Any], *, views: ViewConfig, shard: str,
               projection: torch.Tensor, pair_batch: int = 0) -> tuple[dict[str, Any], int]:
    """View columns (storage.schema.VIEW_COLUMNS but SHARD) of one pool, rows in (row, view) order, and the
    single-teacher pairs scored.

    `columns` are the pool's view-0 signals (`_pool_signals`). Each image's views
    1..n-1 are cut from its box (`ViewConfig.boxes`, keyed by shard and row;
    `apply_box`); the dual teacher embeds every view, and for views v < m the
    single teacher scores the view's image against row i's view-0 candidates
    both ways (the pairs of `single_pass`): fused_proj and itm_pos of (view v
    of image i, text i), i2t_itm over texts j of C_i^i2t, t2i_itm = m(view v of
    image j, text i) over images j of C_i^t2i. Those columns are NaN for v >= m.
    """
    from mcad.pipeline.projection import project
    from mcad.pipeline.signals import single_pass, gather_padded  # signals imports this module

    p, per, start = len(samples), views.n - 1, int(columns[ROW][0])
    images, texts = [s.image for s in samples], [s.caption for s in samples]
    boxes = views.boxes(shard, range(start, start + p), [im.size for im in images])
    local = {dr: np.asarray(columns[col(dr, IDX)]) for dr in DIRECTIONS}  # shard rows -> pool positions
    idx = {dr: torch.from_numpy(np.where(c == PAD_IDX, PAD_IDX, c - start)).long() for dr, c in local.items()}
    k = idx["i2t"].shape[1]
    out = {IMG_EMB: np.zeros((p, per, dual.dim), np.float32), FUSED_PROJ: np.full((p, per, dual.dim), np.nan, np.float32),
           ITM_POS: np.full((p, per), np.nan, np.float32),
           **{col(dr, ITM): np.full((p, per, k), np.nan, np.float32) for dr in DIRECTIONS}}
    pairs = 0
    for v in range(1, views.n):
        crops = [apply_box(image, boxes[i, v - 1]) for i, image in enumerate(images)]
        out[IMG_EMB][:, v - 1] = dual.encode_images(crops).cpu().float().numpy()
        if v < views.m:
            itm, fused, n_pairs = single_pass(single, crops, texts, idx, pair_batch)
            out[FUSED_PROJ][:, v - 1] = project(fused, projection.cpu()).numpy()
            out[ITM_POS][:, v - 1] = itm.diagonal().numpy()
            for dr, rows in (("i2t", itm), ("t2i", itm.T)):
                out[col(dr, ITM)][:, v - 1] = gather_padded(rows, idx[dr]).numpy()
            pairs += n_pairs
    flat = {name: value.reshape((p * per,) + value.shape[2:]) for name, value in out.items()}
    return {KEY: [key for key in columns[KEY] for _ in range(per)],
            ROW: np.repeat(np.arange(start, start + p, dtype=np.int32), per),
            VIEW: np.tile(np.arange(1, views.n, dtype=np.int32), p),
            BOX: boxes.reshape(p * per, 4), **flat}, pairs


def empty_view_columns(*, d: int, f: int = 0, k: int) -> dict[str, Any]:
    """The view columns of a shard with no kept sample."""
    f32, i32 = np.float32, np.int32
    return {KEY: [], ROW: np.zeros(0, i32), VIEW: np.zeros(0, i32), BOX: np.zeros((0, 4), f32),
            IMG_EMB: np.zeros((0, d), f32), FUSED_PROJ: np.zeros((0, d), f32), ITM_POS: np.zeros(0, f32),
            **{col(dr, ITM): np.zeros((0, k), f32) for dr in DIRECTIONS}}
