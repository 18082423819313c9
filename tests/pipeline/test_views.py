"""Views without teachers: boxes keyed by (seed, shard, row, view), the box -> pixels rule, the recipe
check, and the student's pure view choice and replay of a pool's view columns."""
from __future__ import annotations

import math

import numpy as np
import PIL
import pytest
from PIL import Image

from helpers import noise_images
from mcad.pipeline.shards import Sample
from mcad.pipeline.views import (
    RESAMPLE, RULE_VERSION, ViewConfig, apply_box, check_recipe, crop_sample, draw_box, pixel_box, view_rng,
)
from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.student.data import choose_views, replay_views


def test_boxes_are_a_pure_function_of_seed_shard_row_and_view():
    cfg = ViewConfig(n=4, seed=3)
    sizes = [(40, 30), (30, 50), (64, 64)]
    boxes = cfg.boxes("000007", [0, 5, 9], sizes)
    assert boxes.shape == (3, 3, 4) and boxes.dtype == np.float32
    # the same row alone, or in another order, in another call (another worker, a resume): the same boxes
    np.testing.assert_array_equal(cfg.boxes("000007", [9, 0], [sizes[2], sizes[0]]), boxes[[2, 0]])
    assert not np.array_equal(ViewConfig(n=4, seed=4).boxes("000007", [0, 5, 9], sizes), boxes)
    assert not np.array_equal(cfg.boxes("000008", [0, 5, 9], sizes), boxes)
    assert len({tuple(b) for b in boxes.reshape(-1, 4)}) == 9  # views differ from each other
    for (width, height), row in zip(sizes, boxes):
        assert ((row[:, :2] >= 0) & (row[:, 2:] <= 1) & (row[:, :2] < row[:, 2:])).all()
        # edges are whole pixels, recovered exactly from the float32 box
        scaled = row * np.array([width, height, width, height], np.float64)
        np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-3)


def test_boxes_follow_the_crop_ranges():
    scale, ratio = (0.3, 0.6), (0.5, 2.0)
    shares, ratios = [], []
    for row in range(300):
        x0, y0, x1, y1 = draw_box(view_rng(0, "s", row, 1), 200, 100, scale=scale, ratio=ratio)
        w, h = (x1 - x0) * 200, (y1 - y0) * 100
        shares.append(w * h / 20000)
        ratios.append(w / h)
    assert 0.29 <= min(shares) and max(shares) <= 0.61
    assert 0.5 * 0.95 <= min(ratios) and max(ratios) <= 2.0 * 1.05
    # a crop that cannot fit: the central crop within the ratio range
    box = draw_box(view_rng(0, "s", 0, 1), 100, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(box, [0.45, 0.0, 0.55, 1.0], atol=1e-6)


def test_apply_box_is_a_pillow_crop_resized_back_to_the_image_size():
    image = noise_images([(30, 40)])[0]  # 40 wide, 30 high
    box = np.array([0.25, 0.1, 0.8, 0.9], np.float32)
    got = apply_box(image, box)
    edges = (10, 3, 32, 27)  # floor(x * size + 0.5)
    assert pixel_box(box, 40, 30) == edges
    want = image.crop(edges).resize((40, 30), Image.Resampling.BICUBIC)
    assert got.size == image.size and got.tobytes() == want.tobytes()
    assert RESAMPLE == Image.Resampling.BICUBIC and RULE_VERSION == 1
    assert apply_box(image, [0, 0, 1, 1]) is image  # view 0: the decoded image itself
    assert apply_box(image, [0.001, 0, 1, 1]) is image  # rounds to every pixel
    sample = Sample(key="k", image=image, captions=("a caption",))
    assert crop_sample(sample, box).image.tobytes() == want.tobytes() and crop_sample(sample, box).key == "k"


def test_pixel_box_keeps_at_least_one_pixel_and_refuses_a_bad_box():
    assert pixel_box([0.5, 0.5, 0.51, 0.51], 10, 10) == (5, 5, 6, 6)
    assert pixel_box([0.99, 0.0, 1.0, 1.0], 10, 10) == (9, 0, 10, 10)
    for bad in ([0.5, 0.1, 0.5, 0.9], [0.1, 0.1, 1.2, 0.9], [-0.1, 0, 1, 1], [math.nan, 0, 1, 1], [0, 0, 1]):
        with pytest.raises(InputError, match="box"):
            pixel_box(bad, 10, 10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "views must be at least 1"), (dict(n=2, m=3), "single views must be between 1 and"),
    (dict(n=2, m=0), "single views"), (dict(crop_scale=(0, 1)), "crop scale"),
    (dict(crop_scale=(0.5, 1.5)), "crop scale"), (dict(crop_ratio=(2, 1)), "crop ratio"),
    (dict(crop_ratio=("a", 1)), "crop ratio must be two numbers"), (dict(seed=-1), "seed"),
])
def test_view_config_refuses_bad_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        ViewConfig(**kwargs)


def test_recipe_pins_the_pixel_makers_and_the_student_refuses_another():
    recipe = ViewConfig(n=3, m=2, seed=9).recipe()
    assert recipe == {"n": 3, "m": 2, "crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 4 / 3], "seed": 9,
                      "rule_version": 1, "pillow": PIL.__version__, "torchvision": None}
    check_recipe(recipe)
    check_recipe(None)
    with pytest.raises(InputError, match=rf"cut with Pillow 9\.0\.0, this environment has Pillow {PIL.__version__}"):
        check_recipe({**recipe, "pillow": "9.0.0"}, where="S")
    with pytest.raises(InputError, match="box rule 2, this mcad knows rule"):
        check_recipe({**recipe, "rule_version": 2})
    with pytest.raises(InputError, match="made with torchvision 0.28.0, this environment has"):
        check_recipe({**recipe, "torchvision": "0.28.0"})


# ------------------------------------------------------ the student's side (pure)

def test_choose_views_is_a_pure_function_of_seed_epoch_shard_and_row():
    rows = np.arange(12)
    np.testing.assert_array_equal(choose_views("cycle", seed=0, epoch=2, shard="s", rows=rows, n=3), (2 + rows) % 3)
    assert not choose_views("canonical", seed=0, epoch=2, shard="s", rows=rows, n=3).any()
    assert not choose_views("cycle", seed=0, epoch=2, shard="s", rows=rows, n=1).any()
    drawn = choose_views("random", seed=1, epoch=0, shard="s", rows=rows, n=4)
    np.testing.assert_array_equal(drawn[5:], choose_views("random", seed=1, epoch=0, shard="s", rows=rows[5:], n=4))
    assert not np.array_equal(drawn, choose_views("random", seed=1, epoch=1, shard="s", rows=rows, n=4))
    assert not np.array_equal(drawn, choose_views("random", seed=1, epoch=0, shard="t", rows=rows, n=4))
    assert set(drawn.tolist()) <= {0, 1, 2, 3} and len(set(drawn.tolist())) > 1


def _pool(n_rows=4, n=3, m=2, k=3, first=8):
    """A pool as the reader hands it with views: view-0 signals and (rows, views, ...) view arrays."""
    rng = np.random.default_rng(0)
    rows = np.arange(first, first + n_rows)
    idx = np.stack([np.roll(rows, -i)[:k] for i in range(n_rows)])  # row i's candidates: i, i+1, i+2 (mod pool)
    idx[0, 2] = schema.PAD_IDX
    pool = {schema.SHARD: ["s"] * n_rows, schema.ROW: rows,
            schema.IMG_EMB: rng.standard_normal((n_rows, 2)).astype(np.float16),
            schema.FUSED_PROJ: rng.standard_normal((n_rows, 2)).astype(np.float16),
            "i2t_idx": idx, "t2i_idx": idx,
            "i2t_itm": np.where(idx == schema.PAD_IDX, -np.inf, 0.0).astype(np.float32),
            "t2i_itm": np.where(idx == schema.PAD_IDX, -np.inf, 0.0).astype(np.float32),
            schema.DATA: [Sample(key=f"k{r}", image=Image.new("RGB", (10, 10)), captions=("c",)) for r in rows]}
    # view v of row r holds the value 100 * r + v, so the test can see where each number came from
    tag = (100 * rows[:, None] + np.arange(1, n)[None, :]).astype(np.float32)
    pool[schema.view_key(schema.IMG_EMB)] = np.repeat(tag[..., None], 2, axis=2).astype(np.float16)
    pool[schema.view_key(schema.BOX)] = np.tile(np.array([0, 0, 0.5, 0.5], np.float32), (n_rows, n - 1, 1))
    pool[schema.view_key(schema.FUSED_PROJ)] = np.repeat(tag[:, :m - 1, None], 2, axis=2).astype(np.float16)
    pool[schema.view_key(schema.ITM_POS)] = tag[:, :m - 1]
    for dr in schema.DIRECTIONS:  # and + 0.01 * (list position), + 0.5 in the t2i lists; -inf at padding
        value = tag[:, :m - 1, None] + 0.01 * np.arange(k) + (0.5 if dr == "t2i" else 0)
        pool[schema.view_key(f"{dr}_itm")] = np.where(idx[:, None, :] == schema.PAD_IDX, -np.inf, value)
    return pool


def test_replay_views_takes_each_term_from_the_view_that_scored_it_else_view_0():
    pool = _pool()  # rows 8..11, views 0..2, the single teacher scored views 0 and 1 (m = 2)
    chosen = np.array([1, 2, 0, 1])
    cut = []
    got = replay_views(pool, chosen, m=2, crop=lambda s, box: cut.append((s.key, tuple(box))) or s)
    assert cut == [("k8", (0, 0, 0.5, 0.5)), ("k9", (0, 0, 0.5, 0.5)), ("k11", (0, 0, 0.5, 0.5))]
    assert not any(k.startswith(schema.VIEW_PREFIX) for k in got)
    np.testing.assert_array_equal(got[schema.VIEW], chosen)
    np.testing.assert_array_equal(got[schema.IMG_EMB][:, 0], [801, 902, pool[schema.IMG_EMB][2, 0], 1101])
    # fused_proj and the i2t list: from the row's own view when scored (view 1), else view 0
    np.testing.assert_array_equal(got[schema.FUSED_PROJ][:, 0], [801, pool[schema.FUSED_PROJ][1, 0],
                                                                 pool[schema.FUSED_PROJ][2, 0], 1101])
    np.testing.assert_allclose(got["i2t_itm"][0], [801, 801.01, -np.inf])
    np.testing.assert_allclose(got["i2t_itm"][1], [0, 0, 0])
    np.testing.assert_allclose(got["i2t_itm"][3], [1101, 1101.01, 1101.02])
    # row i's t2i list (text i over images j) holds m(image j in j's view, text i): the stored m(view v of
    # image j, text i) of row i at v = chosen[j] where j's view was scored; images 9 (view 2) and 10
    # (view 0) were not scored in their views, so their entries keep view 0's m
    np.testing.assert_allclose(got["t2i_itm"][0], [801.5, 0, -np.inf])        # images 8, 9
    np.testing.assert_allclose(got["t2i_itm"][1], [0, 0, 901.52])             # images 9, 10, 11
    np.testing.assert_allclose(got["t2i_itm"][3], [1101.5, 1101.51, 0])       # images 11, 8, 9
    assert pool["t2i_itm"][0].tolist() == [0, 0, -np.inf]                      # the pool itself is unchanged
