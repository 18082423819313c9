"""Schema v2: the view table written, opened, read per pool, validated and summarised (no teachers)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import flip_in_pages, write_manifest
from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.storage.manifest import (
    MANIFEST_NAME, STATUS_DONE, VIEW_DIGEST_FIELDS, VIEWS_DIR, Manifest, VIEW_FIELDS, views_path,
)
from mcad.storage.reader import open_store
from mcad.storage.checks import check_views
from mcad.storage.integrity import check_integrity
from mcad.storage.views import stable_id, view_stats
from mcad.storage.writer import write_shard

D, F, K, POOL = 8, 12, 3, 4
RECIPE = {"n": 3, "m": 2, "crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 1.3333], "seed": 7,
          "rule_version": 1, "pillow": "0.0", "torchvision": None}


def view_columns(cols: dict, *, n: int, m: int, rng: np.random.Generator) -> dict:
    """Valid view columns (every kept row, views 1..n-1) for a shard's signal columns."""
    n_rows, per = len(cols[schema.KEY]), n - 1
    rows, views = np.repeat(np.arange(n_rows), per), np.tile(np.arange(1, n), n_rows)
    total = len(rows)
    lo = rng.uniform(0, 0.4, (total, 2))
    box = np.concatenate([lo, np.minimum(lo + rng.uniform(0.1, 0.6, (total, 2)), 1.0)], axis=1)
    unit = rng.standard_normal((total, D)).astype(np.float32)
    scored = views < m
    out = {schema.KEY: [cols[schema.KEY][r] for r in rows], schema.ROW: rows, schema.VIEW: views,
           schema.BOX: box.astype(np.float32), schema.IMG_EMB: unit / np.linalg.norm(unit, axis=1, keepdims=True),
           schema.FUSED_PROJ: np.where(scored[:, None], unit, np.nan),
           schema.ITM_POS: np.where(scored, rng.standard_normal(total), np.nan)}
    for dr in schema.DIRECTIONS:
        idx = np.asarray(cols[schema.col(dr, schema.IDX)])[rows]
        itm = np.where(idx == schema.PAD_IDX, -np.inf, rng.standard_normal(idx.shape))
        out[schema.col(dr, schema.ITM)] = np.where(scored[:, None], itm, np.nan)
    return out


@pytest.fixture
def build_view_store(make_store, make_columns):
    return lambda root, **kw: _build_view_store(make_store, make_columns, root, **kw)


@pytest.fixture
def columns(make_columns):
    return make_columns("s0", 6, pool=POOL, d=D, f=F, k=K)


def _build_view_store(make_store, make_columns, root, *, rows=(10, 7), n=3, m=2, seed=0):
    """A v1 synthetic store (tests/conftest.py) rewritten shard by shard with views; returns (root, columns)."""
    make_store(root, shards=len(rows), rows_per_shard=rows, pool=POOL, d=D, f=F, k=K, rejects_per_shard=0, seed=seed)
    manifest = Manifest.load(root)
    manifest.set_views({**RECIPE, "n": n, "m": m})
    rng = np.random.default_rng(seed)
    written = {}
    for i, name in enumerate(sorted(manifest.shards)):
        cols = make_columns(name, rows[i], pool=POOL, d=D, f=F, k=K, seed=seed + i)
        views = view_columns(cols, n=n, m=m, rng=rng)
        info = write_shard(root, name, cols, [], d=D, f=F, k=K, pool_size=POOL, views=views, n_views=n, single_views=m)
        manifest.shards[name].update({k: v for k, v in info.items() if k.endswith(("_sha256", "_bytes"))})
        written[name] = (cols, views)
    manifest.save(root)
    return root, written


def test_view_schema_names_and_types_live_in_schema():
    s = schema.view_schema(d=D, k=K)
    assert s.names == list(schema.VIEW_COLUMNS)
    assert s.field(schema.BOX).type == pa.list_(pa.float32(), 4)
    assert schema.version_of(s) == schema.VIEWS_SCHEMA_VERSION == 2
    assert schema.validate_views(s.empty_table()) == {"d": D, "k": K}
    with pytest.raises(InputError, match="view schema version 1"):
        schema.validate_views(schema.signal_schema(d=D, f=F, k=K).empty_table())


def test_a_store_without_views_keeps_its_v1_manifest(tmp_path, make_store):
    root = make_store(tmp_path / "s", d=D, f=F, k=K, pool=POOL)
    raw = json.loads((root / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == 1 and "views" not in raw
    store = open_store(root)
    assert (store.num_views, store.single_views, store.views) == (1, 1, None)
    assert "views" not in store.fingerprint()
    assert view_stats(store)["views"]["per_sample"] == 1 and check_views(store)["view_rows"] == 0


def test_views_are_written_opened_and_read_per_pool(tmp_path, build_view_store):
    root, written = build_view_store(tmp_path / "s")
    store = open_store(root)
    assert store.manifest.schema_version == 2 and store.num_views == 3 and store.single_views == 2
    assert store.fingerprint()["views"] == {**RECIPE, "n": 3, "m": 2}
    assert pq.read_schema(views_path(root, "00000")).metadata[schema.METADATA_VERSION_KEY] == b"2"
    assert pq.read_schema(root / "signals" / "00000.parquet").metadata[schema.METADATA_VERSION_KEY] == b"1"
    pools = list(store.iter_pools(views=True))
    assert len(pools) == 3 + 2
    for pool in pools:
        cols, views = written[pool[schema.SHARD][0]]
        rows = pool[schema.ROW]
        flat = (rows[:, None] * 2 + np.arange(2)).reshape(-1)  # the pool's view rows in the file
        assert pool[schema.view_key(schema.BOX)].shape == (len(rows), 2, 4)
        np.testing.assert_array_equal(pool[schema.view_key(schema.BOX)].reshape(-1, 4), views[schema.BOX][flat])
        np.testing.assert_array_equal(pool[schema.view_key(schema.IMG_EMB)].reshape(-1, D),
                                      views[schema.IMG_EMB][flat].astype(np.float16))
        scored = rows * 2  # view 1 of each row: the only view the single teacher scored (m = 2)
        assert pool[schema.view_key(schema.ITM_POS)].shape == (len(rows), 1)
        np.testing.assert_array_equal(pool[schema.view_key(schema.ITM_POS)][:, 0],
                                      views[schema.ITM_POS][scored].astype(np.float32))
        np.testing.assert_array_equal(pool[schema.view_key("t2i_itm")][:, 0], views["t2i_itm"][scored].astype(np.float32))
    assert all(schema.view_key(schema.BOX) not in p for p in store.iter_pools())  # only when asked


def test_views_of_a_single_teacher_view_only_store_have_no_scored_columns(tmp_path, build_view_store):
    root, _ = build_view_store(tmp_path / "s", rows=(5,), n=2, m=1)
    pool = next(open_store(root).iter_pools(views=True))
    assert pool[schema.view_key(schema.FUSED_PROJ)].shape == (4, 0, D)
    assert pool[schema.view_key(schema.IMG_EMB)].shape == (4, 1, D)


def test_validate_views_accepts_a_good_store_and_counts_its_view_rows(tmp_path, build_view_store):
    root, _ = build_view_store(tmp_path / "s")
    store = open_store(root)
    assert check_views(store) == {"views": 3, "view_rows": (10 + 7) * 2}
    assert check_integrity(store)["files"] == 2 * 3  # signals, rejects and views of both shards
    stats = view_stats(store)
    assert stats["views"] == {"per_sample": 3, "single_scored": 2, "crop_scale": [0.5, 1.0],
                              "crop_ratio": [0.75, 1.3333], "seed": 7}
    sizes = stats["bytes_per_sample"]
    assert sizes["views"] > 0 and sizes["total"] == pytest.approx(sizes["signals"] + sizes["views"] + sizes["rejects"])


def _rewrite_views(root, name, change):
    """Rewrite a view file with `change(dict of columns)` applied, same row count, digests recorded."""
    path = views_path(root, name)
    table = pq.read_table(path)
    cols = {c: table.column(c) for c in table.column_names}
    change(cols)
    pq.write_table(pa.table(cols, schema=table.schema), path)
    raw = json.loads((root / MANIFEST_NAME).read_text())
    for field in VIEW_DIGEST_FIELDS[VIEWS_DIR]:
        raw["shards"][name].pop(field)
    write_manifest(root, raw)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.__setitem__(schema.BOX, pa.array([[0.5, 0.0, 1.5, 1.0]] + c[schema.BOX].to_pylist()[1:],
                                                     pa.list_(pa.float32(), 4))), "a box lies outside [0, 1]"),
    (lambda c: c.__setitem__(schema.BOX, pa.array([[0.5, 0.0, 0.5, 1.0]] + c[schema.BOX].to_pylist()[1:],
                                                     pa.list_(pa.float32(), 4))), "a box lies outside [0, 1] or is empty"),
    (lambda c: c.__setitem__(schema.VIEW, pa.array([2, 1] + c[schema.VIEW].to_pylist()[2:], pa.int32())),
     "rows do not hold views 1..2 of each kept row in order"),
    (lambda c: c.__setitem__(schema.KEY, pa.array(["other"] + c[schema.KEY].to_pylist()[1:])),
     "keys differ from the signals file's"),
    (lambda c: c.__setitem__(schema.ITM_POS, pa.array([None] + c[schema.ITM_POS].to_pylist()[1:], pa.float32())),
     "single-teacher columns are not null exactly at views >= 2"),
])
def test_validate_views_names_each_broken_rule(tmp_path, build_view_store, change, problem):
    root, _ = build_view_store(tmp_path / "s")
    _rewrite_views(root, "00000", change)
    with pytest.raises(InputError, match=r"shard 00000: view file: .*" + problem.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.")):
        check_views(open_store(root))


def test_open_store_refuses_a_missing_view_file_or_a_missing_view(tmp_path, build_view_store):
    root, _ = build_view_store(tmp_path / "s")
    _rewrite_views(root, "00001", lambda c: [c.__setitem__(k, v.slice(0, len(v) - 1)) for k, v in list(c.items())])
    with pytest.raises(InputError, match="shard 00001: view file holds 13 rows, expected 14 .*a view is missing"):
        open_store(root)
    views_path(root, "00001").unlink()
    with pytest.raises(InputError, match="shard 00001: manifest says done but views/00001.parquet is missing"):
        open_store(root)


def test_a_damaged_view_file_is_refused_by_its_digest_and_its_pages(tmp_path, build_view_store):
    root, _ = build_view_store(tmp_path / "s")
    flip_in_pages(views_path(root, "00000"), schema.IMG_EMB)
    store = open_store(root)
    with pytest.raises(InputError, match="shard 00000: views/00000.parquet"):
        store.verify_files()
    with pytest.raises(InputError, match="views/00000.parquet"):
        list(open_store(root).iter_pools(views=True))
    # Without recorded digests, the page checksums still catch it: validate decodes every view page.
    raw = json.loads((root / MANIFEST_NAME).read_text())
    for field in VIEW_DIGEST_FIELDS[VIEWS_DIR]:
        raw["shards"]["00000"].pop(field)
    write_manifest(root, raw)
    with pytest.raises(InputError, match=f"views/00000.parquet.*{schema.IMG_EMB}"):
        check_integrity(open_store(root))


def test_writer_refuses_views_that_break_the_contract(tmp_path, columns):
    rng, cols = np.random.default_rng(0), columns
    good = view_columns(cols, n=3, m=2, rng=rng)
    kw = dict(d=D, f=F, k=K, pool_size=POOL, n_views=3, single_views=2)
    box = good[schema.BOX].copy()
    box[3] = [0.2, 0.2, 0.1, 0.9]
    cases = [({**good, schema.BOX: box}, "boxes must lie inside"),
             ({**good, schema.VIEW: good[schema.VIEW][::-1]}, "views 1..2 in order"),
             ({**good, schema.KEY: ["x"] + good[schema.KEY][1:]}, "keys or shard names differ"),
             ({**good, schema.ITM_POS: np.full(12, np.nan)}, "itm_pos must be finite where view < 2"),
             ({k: v[:-1] for k, v in good.items()}, "11 view rows, expected 6 rows x 2 views")]
    for views, message in cases:
        with pytest.raises(ValueError, match=message):
            write_shard(tmp_path, "s0", cols, [], views=views, **kw)
        assert not list(tmp_path.rglob("*.parquet"))
    with pytest.raises(ValueError, match="no view columns"):
        write_shard(tmp_path, "s0", cols, [], **kw)
    write_shard(tmp_path, "s0", cols, [], views=good, **kw)
    table = pq.read_table(views_path(tmp_path, "s0"))
    assert table.column(schema.FUSED_PROJ).null_count == 6  # view 2 of each row: not scored


def test_a_failed_signals_write_removes_the_shards_view_file(tmp_path, columns):
    rng, cols = np.random.default_rng(0), columns
    (tmp_path / "signals").write_text("a file where the signals folder should be")
    with pytest.raises(OSError):
        write_shard(tmp_path, "s0", cols, [], d=D, f=F, k=K, pool_size=POOL,
                    views=view_columns(cols, n=3, m=2, rng=rng), n_views=3, single_views=2)
    assert not views_path(tmp_path, "s0").exists() and not (tmp_path / "rejects" / "s0.parquet").exists()


def test_manifest_refuses_a_recipe_that_does_not_fit_its_version(tmp_path, build_view_store):
    root, _ = build_view_store(tmp_path / "s")
    raw = json.loads((root / MANIFEST_NAME).read_text())
    for edit, message in ((lambda r: r.pop("views"), "needs its view recipe"),
                          (lambda r: r.__setitem__("schema_version", 1), "a schema v1 manifest with a view recipe"),
                          (lambda r: r["views"].pop("seed"), r"view recipe lacks \['seed'\]"),
                          (lambda r: r["views"].__setitem__("m", 4), "1 <= m <= n")):
        broken = json.loads(json.dumps(raw))
        edit(broken)
        write_manifest(root, broken)
        with pytest.raises(InputError, match=message):
            Manifest.load(root)
    assert set(raw["views"]) == set(VIEW_FIELDS) and raw["shards"]["00000"]["status"] == STATUS_DONE


def test_stable_id_is_a_fixed_64_bit_number():
    """Boxes are keyed by it: it must not change between processes, runs or versions (sha256, not hash())."""
    assert stable_id("000001") == 0xf047201eb6a0fda7
    assert stable_id("000002") != stable_id("000001")


@pytest.mark.parametrize("column", [schema.ITM_POS, schema.FUSED_PROJ])
def test_a_null_where_the_single_teacher_scored_is_refused_when_a_pool_is_read(tmp_path, build_view_store, column):
    from mcad.storage.views import view_arrays

    root, _ = build_view_store(tmp_path / "s")
    table = pq.read_table(views_path(root, "00000"))
    rows = np.arange(POOL)
    first = table.slice(0, POOL * 2)  # rows 0..POOL-1, views 1 and 2 (the single teacher scored view 1)
    assert set(view_arrays(first, rows=rows, n=3, m=2, where="x")) >= {schema.view_key(column)}
    values = first.column(column).to_pylist()
    values[0] = None  # row 0, view 1: scored
    damaged = first.set_column(first.schema.get_field_index(column), column,
                               pa.array(values, first.schema.field(column).type))
    with pytest.raises(InputError, match=f"column {column} is null for a view the single teacher scored"):
        view_arrays(damaged, rows=rows, n=3, m=2, where="x")


def test_a_signals_file_must_carry_the_signals_version():
    """The store may be v2; its signals files stay v1, and a signals table stamped v2 is refused."""
    table = schema.signal_schema(d=D, f=F, k=K).empty_table()
    assert schema.validate(table) == {"d": D, "f": F, "k": K}
    stamped = table.replace_schema_metadata({schema.METADATA_VERSION_KEY: str(schema.VIEWS_SCHEMA_VERSION).encode()})
    with pytest.raises(InputError, match="signal schema version 2"):
        schema.validate(stamped)
