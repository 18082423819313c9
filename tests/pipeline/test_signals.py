"""MCAD signal maths. THE KEY TEST recomputes the stored signals with plain transformers.

The reference side uses only transformers and torch (CLIPModel.forward,
BlipForImageTextRetrieval.forward with use_itm_head=True), none of mcad's
maths, and compares within float16 tolerance (the store keeps float16 vectors).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import noise_images
from mcad.pipeline.shards import Reject, Sample
from mcad.pipeline.pools import neighbour_order
from mcad.pipeline.projection import (
    calibrate, calibration_pairs, fit_projection, load_projection, project, save_projection,
)
from mcad.pipeline.signals import (
    PassConfig, candidates, compute_pool, pools, shard_signals, shard_signals_and_views,
)
from mcad.pipeline.views import ViewConfig, apply_box
from mcad.pipeline.shapes.teacher_models import make_tiny_teachers
from mcad.pipeline.teachers import load_teachers
from mcad.storage import schema
from mcad.storage.errors import InputError

N, POOL_SIZE, K = 10, 4, 3  # pools of 4, 4, 2: the last is smaller than K and padded
CAPTIONS = [f"a {size} {colour} {shape}" for size, colour, shape in zip(
    ["small", "large"] * 5, ["red", "blue", "green", "yellow", "purple"] * 2,
    ["circle", "square", "triangle", "star", "diamond", "square", "circle", "star", "triangle", "diamond"])]
TOL = dict(atol=2e-3, rtol=2e-3)  # float16 vectors keep ~3 significant digits
TOL32 = dict(atol=1e-4, rtol=1e-4)  # float32 columns: only batching/padding rounding


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import BlipForImageTextRetrieval

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored after the module: later tests (a student resumed in-process) need theirs
    clip_dir, blip_dir = make_tiny_teachers(tmp_path_factory.mktemp("teachers"), CAPTIONS)
    # A freshly initialised ITM head gives nearly equal logits for every pair
    # (spread ~1e-4); a wide random head makes a mixed-up pair visible.
    blip = BlipForImageTextRetrieval.from_pretrained(blip_dir)
    torch.manual_seed(1)
    torch.nn.init.normal_(blip.itm_head.weight, std=1.0)
    blip.save_pretrained(blip_dir)
    yield clip_dir, blip_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers(dirs):
    return load_teachers(*dirs)


@pytest.fixture(scope="module")
def samples():
    images = noise_images([(24 + i, 30) for i in range(N)])
    return [Sample(key=f"s{i:03d}", image=images[i], captions=(CAPTIONS[i], "an unused second caption"))
            for i in range(N)]


@pytest.fixture(scope="module")
def items(samples):
    """The shard as iter_shard yields it: samples with rejects in between."""
    out = list(samples)
    out.insert(3, Reject("bad1", "decode", "truncated jpeg"))
    out.insert(9, Reject("bad2", "no_caption", "empty txt"))
    return out


@pytest.fixture(scope="module")
def config():
    return PassConfig(pool_size=POOL_SIZE, topk=K, pair_batch=5, calibration_rows=6, ridge=1e-2)


@pytest.fixture(scope="module")
def projection(teachers, items, config):
    return calibrate(*teachers, items, config=config)


@pytest.fixture(scope="module")
def result(teachers, items, config, projection):
    return shard_signals(*teachers, items, shard="shard-000", config=config, projection=projection)


def _reference_pool(dirs, pool_samples):
    """Dual logits, embeddings and full ITM / fused matrices from the HF models alone."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval, CLIPModel

    images = [s.image for s in pool_samples]
    texts = [s.caption for s in pool_samples]
    clip = CLIPModel.from_pretrained(dirs[0]).eval()
    inputs = AutoProcessor.from_pretrained(dirs[0])(images=images, text=texts, padding=True, return_tensors="pt")
    blip = BlipForImageTextRetrieval.from_pretrained(dirs[1]).eval()
    proc = AutoProcessor.from_pretrained(dirs[1])
    p = len(pool_samples)
    pairs = [(i, j) for i in range(p) for j in range(p)]
    pair_inputs = proc(images=[images[i] for i, _ in pairs], text=[texts[j] for _, j in pairs],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(**inputs)
        itm = blip(**pair_inputs, use_itm_head=True)
    score = itm.itm_score
    return {
        "v": out.image_embeds, "t": out.text_embeds, "logits": out.logits_per_image,
        "m": (score[:, 1] - score[:, 0]).reshape(p, p),
        "fused": itm.question_embeds[:, 0].reshape(p, p, -1),
    }


def _expected_set(row: torch.Tensor, positive: int, k: int) -> set[int]:
    top = torch.topk(row, min(k, len(row))).indices.tolist()
    if positive not in top:
        top[-1] = positive
    return set(top)


def test_key_stored_signals_equal_hf_recomputation(dirs, samples, result, projection):
    columns, rejects, stats = result
    assert rejects == [("bad1", "decode", "truncated jpeg"), ("bad2", "no_caption", "empty txt")]
    assert stats["rows"] == N and stats["rejected"] == 2 and stats["pools"] == 3
    assert columns[schema.KEY] == [s.key for s in samples]
    assert columns[schema.SHARD] == ["shard-000"] * N
    np.testing.assert_array_equal(columns[schema.ROW], np.arange(N))
    np.testing.assert_array_equal(columns[schema.POOL], np.arange(N) // POOL_SIZE)

    replaced = 0
    for rows in pools(N, POOL_SIZE):
        ref = _reference_pool(dirs, samples[rows.start:rows.stop])
        p, at = len(rows), slice(rows.start, rows.stop)
        close = lambda got, want: np.testing.assert_allclose(got, want.numpy(), **TOL)  # noqa: E731
        close32 = lambda got, want: np.testing.assert_allclose(got, want.numpy(), **TOL32)  # noqa: E731
        close(columns[schema.IMG_EMB][at], ref["v"])
        close(columns[schema.TXT_EMB][at], ref["t"])
        fused_ref = ref["fused"].diagonal(dim1=0, dim2=1).T
        close(columns[schema.FUSED][at], fused_ref)
        close32(columns[schema.ITM_POS][at], ref["m"].diagonal())
        close(columns[schema.FUSED_PROJ][at], torch.nn.functional.normalize(fused_ref @ projection, dim=-1))
        queries = {"i2t": (ref["logits"], ref["m"]), "t2i": (ref["logits"].T, ref["m"].T)}
        for dr, (logits, m) in queries.items():
            close32(columns[schema.col(dr, schema.DUAL_LSE)][at], torch.logsumexp(logits, dim=1))
            idx, dual, itm = (columns[schema.col(dr, f)][at] for f in (schema.IDX, schema.DUAL, schema.ITM))
            assert idx.shape == (p, K)
            for i in range(p):
                valid = idx[i] != schema.PAD_IDX
                local = idx[i][valid] - rows.start
                assert set(local.tolist()) == _expected_set(logits[i], i, K), (dr, rows, i)
                replaced += i not in torch.topk(logits[i], min(K, p)).indices.tolist()
                close32(dual[i][valid], logits[i, local])
                close32(itm[i][valid], m[i, local])
                assert np.all(np.diff(dual[i][valid]) <= 0)  # sorted by dual logit
                assert valid.sum() == min(K, p)
                assert np.all(np.isneginf(dual[i][~valid])) and np.all(np.isneginf(itm[i][~valid]))
    assert replaced > 0  # the positive-replacement path was exercised on real teachers
    assert np.ptp(columns[schema.ITM_POS]) > 100 * TOL32["atol"]  # pairs differ far beyond the tolerance
    assert (columns[schema.col("i2t", schema.IDX)][8:] == schema.PAD_IDX).sum() == 2  # last pool: 2 rows, K = 3


def test_columns_are_what_the_writer_takes(tmp_path, teachers, result, config):
    from mcad.storage.writer import write_shard

    columns, rejects, _ = result
    dual, single = teachers
    written = write_shard(tmp_path, "shard-000", columns, rejects, d=dual.dim, f=single.dim_fused,
                          k=config.topk, pool_size=config.pool_size)
    assert written["rows"] == N and written["rejected"] == 2 and written["pools"] == 3
    table = pq.read_table(tmp_path / "signals" / "shard-000.parquet")
    assert schema.validate(table) == {"d": dual.dim, "f": single.dim_fused, "k": K}


def test_calibration_fits_the_first_kept_rows(teachers, samples, items, config, projection):
    # calibrate reads in chunks of pair_batch (5 + 1 here): equal up to float rounding
    fused, target = calibration_pairs(*teachers, samples[:config.calibration_rows])
    torch.testing.assert_close(projection, fit_projection(fused, target, ridge=config.ridge),
                               atol=1e-4, rtol=1e-4)
    fused7, target7 = calibration_pairs(*teachers, samples[:config.calibration_rows + 1])
    assert not torch.allclose(projection, fit_projection(fused7, target7, ridge=config.ridge), atol=1e-4)
    assert projection.shape == (teachers[1].dim_fused, teachers[0].dim)
    with pytest.raises(InputError, match="no kept samples"):
        calibrate(*teachers, [Reject("x", "decode", "")], config=config)


def test_deterministic_and_pair_batch_free(teachers, items, config, projection, result):
    again = shard_signals(*teachers, items, shard="shard-000", config=config, projection=projection)[0]
    big_batch = PassConfig(pool_size=POOL_SIZE, topk=K, pair_batch=64)
    other = shard_signals(*teachers, items, shard="shard-000", config=big_batch, projection=projection)[0]
    sized = PassConfig(pool_size=POOL_SIZE, topk=K, pair_batch=0)  # 0: the device's size (256 on a CPU)
    device = shard_signals(*teachers, items, shard="shard-000", config=sized, projection=projection)[0]
    for name, value in result[0].items():
        if isinstance(value, list):
            assert again[name] == value and other[name] == value == device[name]
        else:
            np.testing.assert_array_equal(again[name], value)
            np.testing.assert_allclose(other[name], value, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(device[name], value, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="pair batch"):
        PassConfig(pool_size=POOL_SIZE, topk=K, pair_batch=-1)


def test_compute_pool_matches_shard_rows(teachers, samples, result, projection):
    pool = compute_pool(*teachers, samples[4:8], k=K, projection=projection, start=4)
    for name, value in pool.items():
        if isinstance(value, list):
            assert value == result[0][name][4:8]
        else:
            np.testing.assert_array_equal(value, result[0][name][4:8])
    assert schema.FUSED_PROJ not in compute_pool(*teachers, samples[:2], k=K)


def test_empty_shard_and_bad_projection(teachers, config, projection):
    columns, rejects, stats = shard_signals(*teachers, [Reject("k", "decode", "x")], shard="e",
                                            config=config, projection=projection)
    assert stats["rows"] == 0 and rejects == [("k", "decode", "x")]
    assert columns[schema.IMG_EMB].shape == (0, teachers[0].dim) and columns[schema.SHARD] == []
    with pytest.raises(InputError, match="projection"):
        shard_signals(*teachers, [], shard="e", config=config, projection=projection[:, :5])


# ------------------------------------------------------ hand-made maths

def test_candidates_order_replacement_and_padding():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0],
                           [1.0, 9.0, 2.0, 0.0],
                           [7.0, 6.0, 0.5, 8.0],
                           [2.0, 2.0, 2.0, 2.0]])
    # image 0: top-2 texts are 1, 2; positive 0 takes the k-th place
    assert candidates(logits, 2, "i2t").tolist() == [[1, 0], [1, 2], [3, 2], [0, 3]]
    # ties keep the lower index first; the positive (3) replaces the 2nd place
    assert candidates(logits, 3, "i2t").tolist() == [[1, 2, 0], [1, 2, 0], [3, 0, 2], [0, 1, 3]]
    # text j ranks images by column j
    assert candidates(logits, 2, "t2i").tolist() == [[2, 0], [1, 2], [0, 2], [2, 3]]
    small = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    assert candidates(small, 4, "i2t").tolist() == [[1, 0, schema.PAD_IDX, schema.PAD_IDX], [0, 1, schema.PAD_IDX, schema.PAD_IDX]]
    assert candidates(small, 4, "t2i").tolist() == [[1, 0, schema.PAD_IDX, schema.PAD_IDX], [0, 1, schema.PAD_IDX, schema.PAD_IDX]]
    with pytest.raises(ValueError):
        candidates(torch.zeros(2, 3), 1, "i2t")


def test_pools_are_consecutive():
    assert pools(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert pools(8, 4) == [range(0, 4), range(4, 8)]
    assert pools(0, 4) == []


def test_fit_projection_matches_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 4))
    ridge = 0.7
    want = np.linalg.solve(x.T @ x + ridge * np.eye(8), x.T @ y)
    got = fit_projection(torch.tensor(x), torch.tensor(y), ridge=ridge)
    assert got.dtype == torch.float32 and got.shape == (8, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    lstsq = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(fit_projection(torch.tensor(x), torch.tensor(y), ridge=0).numpy(), lstsq,
                               rtol=1e-5, atol=1e-6)
    g = project(torch.tensor(x, dtype=torch.float32), got)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(50))


def test_projection_roundtrip(tmp_path):
    w = torch.randn(6, 3)
    path = save_projection(w, tmp_path / "fusion_proj.safetensors", metadata={"rows": 12})
    assert torch.equal(load_projection(path), w)
    with pytest.raises(InputError, match="no fusion projection"):
        load_projection(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError):
        load_projection(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("kwargs", [dict(topk=0), dict(pool_size=1, topk=1), dict(pool_size=4, topk=5),
                                    dict(pair_batch=-1), dict(calibration_rows=0), dict(ridge=-1.0),
                                    dict(pools="random")])
def test_pass_config_refuses_bad_values(kwargs):
    with pytest.raises(InputError):
        PassConfig(**kwargs)


def test_pools_of_one_and_a_single_candidate():
    assert pools(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError):
        pools(3, 0)
    logits = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    assert candidates(logits, 1, "i2t").tolist() == [[0], [1]]  # k = 1: the positive alone
    with pytest.raises(ValueError):
        candidates(logits, 0, "i2t")


def test_candidate_ties_keep_the_lower_index_first_in_a_large_pool():
    # 64 rows with many equal logits (a sort that is not stable reorders them)
    logits = torch.zeros(64, 64)
    logits[:, ::3] = 1.0
    want = list(range(0, 64, 3))[:8]
    got = candidates(logits, 8, "i2t")
    assert got[1].tolist() == want[:7] + [1]  # row 1's positive takes the last place
    assert got[0].tolist() == want


def test_gather_padded_reads_a_one_row_pool():
    from mcad.pipeline.signals import gather_padded

    got = gather_padded(torch.tensor([[2.5]]), torch.tensor([[0, schema.PAD_IDX, schema.PAD_IDX]]))
    assert got.tolist() == [[2.5, float("-inf"), float("-inf")]]


def test_projection_target_and_fit_projection_edges():
    from mcad.pipeline.projection import projection_target

    got = projection_target(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(got, torch.tensor([[3.0, 1.0]]) / 10 ** 0.5)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 3))
    for ridge in (1.0, 1e-2):  # 1e-2 is the default
        want = np.linalg.solve(x.T @ x + ridge * np.eye(4), x.T @ y)
        kw = {"ridge": ridge} if ridge == 1.0 else {}
        np.testing.assert_allclose(fit_projection(torch.tensor(x), torch.tensor(y), **kw).numpy(), want,
                                   rtol=1e-5, atol=1e-6)
    assert fit_projection(torch.ones(1, 2), torch.ones(1, 2)).shape == (2, 2)  # one pair is enough
    with pytest.raises(InputError, match="no pairs"):
        fit_projection(torch.zeros(0, 3), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="need fused"):
        fit_projection(torch.zeros(5), torch.zeros(5, 2))


def test_a_pool_of_one_sample_and_an_empty_pool(teachers, samples, projection):
    pool = compute_pool(*teachers, samples[:1], k=K, projection=projection, start=7)
    assert pool[schema.ROW].tolist() == [7]
    assert pool[schema.col("i2t", schema.IDX)].tolist() == [[7] + [schema.PAD_IDX] * (K - 1)]
    with pytest.raises(ValueError, match="empty pool"):
        compute_pool(*teachers, [], k=K, projection=projection)


# ------------------------------------------------------------- views (schema v2)

VIEWS = ViewConfig(n=3, m=2, crop_scale=(0.3, 0.9), seed=5)


@pytest.fixture(scope="module")
def view_result(teachers, items, config, projection):
    return shard_signals_and_views(*teachers, items, shard="shard-000", config=dataclasses.replace(config, views=VIEWS),
                                   projection=projection)


def test_views_leave_the_view_0_signals_unchanged(result, view_result):
    columns, views, rejects, stats = view_result
    assert rejects == result[1] and stats["rows"] == N
    for name, value in result[0].items():
        if isinstance(value, list):
            assert columns[name] == value
        else:
            np.testing.assert_array_equal(columns[name], value)
    assert views[schema.KEY] == [s for s in result[0][schema.KEY] for _ in range(2)]
    np.testing.assert_array_equal(views[schema.VIEW], np.tile([1, 2], N))
    np.testing.assert_array_equal(views[schema.ROW], np.repeat(np.arange(N), 2))
    assert result[2]["pairs"] < stats["pairs"]  # view 1 was scored by the single teacher too
    with pytest.raises(ValueError, match="shard_signals_and_views"):
        shard_signals(None, None, [], shard="x", config=PassConfig(views=VIEWS), projection=None)


def test_key_views_equal_hf_recomputation_of_the_reapplied_boxes(dirs, samples, view_result, projection):
    """Plain transformers on each re-applied box: the dual embedding (cosine >= 0.999 with the stored
    float16 one) and, for the view the single teacher scored, its ITM logits and fused projection over
    the row's view-0 candidates, both ways."""
    columns, views = view_result[:2]
    close = lambda got, want: np.testing.assert_allclose(got, want.numpy(), **TOL)  # noqa: E731
    close32 = lambda got, want: np.testing.assert_allclose(got, want.numpy(), **TOL32)  # noqa: E731
    for rows in pools(N, POOL_SIZE):
        for v in (1, 2):
            at = [r * 2 + v - 1 for r in rows]
            crops = [dataclasses.replace(samples[r], image=apply_box(samples[r].image, views[schema.BOX][a]))
                     for r, a in zip(rows, at)]
            ref = _reference_pool(dirs, crops)
            stored = torch.nn.functional.normalize(torch.tensor(views[schema.IMG_EMB][at], dtype=torch.float32), dim=-1)
            assert (stored * ref["v"]).sum(dim=1).min() >= 0.999
            if v == 2:  # not scored by the single teacher (m = 2)
                assert np.isnan(views[schema.ITM_POS][at]).all() and np.isnan(views["t2i_itm"][at]).all()
                continue
            close32(views[schema.ITM_POS][at], ref["m"].diagonal())
            fused_ref = ref["fused"].diagonal(dim1=0, dim2=1).T
            close(views[schema.FUSED_PROJ][at], torch.nn.functional.normalize(fused_ref @ projection, dim=-1))
            for dr, m in (("i2t", ref["m"]), ("t2i", ref["m"].T)):
                idx, itm = columns[schema.col(dr, schema.IDX)][rows.start:rows.stop], views[schema.col(dr, schema.ITM)][at]
                for i in range(len(rows)):
                    valid = idx[i] != schema.PAD_IDX
                    close32(itm[i][valid], m[i, idx[i][valid] - rows.start])
                    assert np.isneginf(itm[i][~valid]).all()


class _Recording:
    """A real teacher that also keeps the pixels of every image it is handed."""

    def __init__(self, teacher):
        self.teacher, self.pixels = teacher, []

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def encode_images(self, images):
        self.pixels.append([np.asarray(image).copy() for image in images])
        return self.teacher.encode_images(images)


def test_a_stored_box_reapplied_gives_the_pixels_the_pass_embedded(tmp_path, teachers, samples, config, projection):
    from mcad.storage.writer import write_shard

    dual, single = teachers
    recording = _Recording(dual)
    cfg = dataclasses.replace(config, views=VIEWS)
    columns, views, rejects, _ = shard_signals_and_views(recording, single, samples[:POOL_SIZE], shard="s",
                                                         config=cfg, projection=projection)
    write_shard(tmp_path, "s", columns, rejects, d=dual.dim, f=single.dim_fused, k=K, pool_size=POOL_SIZE,
                views=views, n_views=3, single_views=2)
    table = pq.read_table(tmp_path / "views" / "s.parquet")  # the box as a student reads it: float32 from Parquet
    boxes = np.asarray(table.column(schema.BOX).combine_chunks().flatten()).reshape(POOL_SIZE, 2, 4)
    assert len(recording.pixels) == 3  # one pool: view 0, then views 1 and 2
    for i, sample in enumerate(samples[:POOL_SIZE]):
        assert np.array_equal(recording.pixels[0][i], np.asarray(sample.image))
        for v in (1, 2):
            replayed = np.asarray(apply_box(sample.image, boxes[i, v - 1]))
            assert np.array_equal(replayed, recording.pixels[v][i]), (i, v)
            assert replayed.shape == np.asarray(sample.image).shape and not np.array_equal(replayed, recording.pixels[0][i])


# ---------------------------------------------------------------- neighbour pools (issue #18)

def test_neighbour_pools_group_look_alikes_and_keep_the_pool_maths(tmp_path, teachers, samples, items, config,
                                                                  projection, result):
    """--pools neighbours: the shard's rows follow neighbour_order of the dual image embeddings (keys
    keep their identity, pool = row // P), each pool's signals are the pool maths of its members
    (compute_pool, the online path, gives them again), the writer takes the columns, and a rerun
    gives the same bytes."""
    from mcad.storage.writer import write_shard

    cfg = dataclasses.replace(config, pools="neighbours")
    columns, rejects, stats = shard_signals(*teachers, items, shard="shard-000", config=cfg, projection=projection)
    dual, single = teachers
    # grouped by the dual embeddings a consecutive pass stores (the same P-sample batches)
    order = neighbour_order(result[0][schema.IMG_EMB], POOL_SIZE)
    assert order.tolist() != list(range(N))  # the grouping moved samples between pools here
    assert columns[schema.KEY] == [samples[i].key for i in order]
    np.testing.assert_array_equal(columns[schema.ROW], np.arange(N))
    np.testing.assert_array_equal(columns[schema.POOL], np.arange(N) // POOL_SIZE)
    assert rejects == result[1] and (stats["rows"], stats["pools"]) == (N, 3)
    for lo in range(0, N, POOL_SIZE):
        members = [samples[i] for i in order[lo:lo + POOL_SIZE]]
        pool = compute_pool(dual, single, members, k=K, projection=projection, pair_batch=5, start=lo)
        for name, value in pool.items():
            if isinstance(value, list):
                assert value == columns[name][lo:lo + POOL_SIZE]
            else:
                np.testing.assert_allclose(value, columns[name][lo:lo + POOL_SIZE], **TOL32, err_msg=name)
    # a sample's own columns do not depend on its pool (its embeddings are the consecutive pass's)
    back = order
    for name in (schema.IMG_EMB, schema.TXT_EMB):
        np.testing.assert_array_equal(columns[name], result[0][name][back], err_msg=name)
    for name in (schema.FUSED, schema.ITM_POS):
        np.testing.assert_allclose(columns[name], result[0][name][back], **TOL32, err_msg=name)
    written = write_shard(tmp_path, "shard-000", columns, rejects, d=dual.dim, f=single.dim_fused, k=K,
                          pool_size=POOL_SIZE)
    again = shard_signals(*teachers, items, shard="shard-000", config=cfg, projection=projection)[0]
    for name, value in columns.items():
        assert again[name] == value if isinstance(value, list) else np.array_equal(again[name], value), name
    assert written["rows"] == N and written["pools"] == 3
    assert shard_signals(*teachers, [Reject("k", "decode", "x")], shard="e", config=cfg,
                         projection=projection)[2]["rows"] == 0


def test_neighbour_pools_with_views_keep_the_view_table_in_row_order(tmp_path, teachers, items, config, projection):
    """Views and neighbour pools together: view rows follow the reordered signals rows (their boxes
    drawn for the sample's new row), and the writer takes both tables."""
    from mcad.storage.writer import write_shard

    cfg = dataclasses.replace(config, views=VIEWS, pools="neighbours")
    columns, views, rejects, _ = shard_signals_and_views(*teachers, items, shard="shard-000", config=cfg,
                                                         projection=projection)
    assert views[schema.KEY] == [k for k in columns[schema.KEY] for _ in range(VIEWS.n - 1)]
    np.testing.assert_array_equal(views[schema.ROW], np.repeat(np.arange(N), VIEWS.n - 1))
    dual, single = teachers
    written = write_shard(tmp_path, "shard-000", columns, rejects, d=dual.dim, f=single.dim_fused, k=K,
                          pool_size=POOL_SIZE, views=views, n_views=VIEWS.n, single_views=VIEWS.m)
    assert written["rows"] == N
