"""storage.query: DuckDB views, stats against numpy, row checks, key checks against data."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mcad.storage.checks import check_data_keys, check_store
from mcad.storage.query import LOGIT_FIELDS, connect, sql, store_stats
from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.storage.manifest import STATUS_DONE, Manifest, rejects_path, signals_path
from mcad.storage.reader import open_store
from mcad.storage.writer import write_shard


def _numpy_candidate_stats(store_path) -> dict:
    """The same quantities as candidate_stats, from pyarrow-read columns with numpy."""
    store = open_store(store_path)
    table = pa.concat_tables(pq.read_table(signals_path(store_path, n)) for n in store.shards)
    out = {}
    for dr in schema.DIRECTIONS:
        out[dr] = {}
        for short, fld in LOGIT_FIELDS.items():
            logits = np.stack(table[schema.col(dr, fld)].to_numpy(zero_copy_only=False)).astype(np.float64)
            real = np.isfinite(logits)
            mx = np.where(real, logits, -np.inf).max(axis=1, keepdims=True)
            e = np.where(real, np.exp(logits - mx), 0.0)
            p = e / e.sum(axis=1, keepdims=True)
            ent = -np.where(real, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
            out[dr][short] = {"top1": p.max(axis=1).mean(), "entropy": ent.mean()}
        dual = np.stack(table[schema.col(dr, schema.DUAL)].to_numpy(zero_copy_only=False)).astype(np.float64)
        lse_k = np.log(np.where(np.isfinite(dual), np.exp(dual), 0.0).sum(axis=1))
        pool_lse = table[schema.col(dr, schema.DUAL_LSE)].to_numpy().astype(np.float64)
        out[dr]["topk_mass"] = np.exp(lse_k - pool_lse).mean()
    return out


def test_stats_match_numpy(tmp_path, make_store):
    # Pools of 5 with K=4: the last pool of each shard (2 and 1 rows) has padded lists.
    path = make_store(tmp_path / "s", shards=3, rows_per_shard=(12, 6), pool=5, k=4, rejects_per_shard=2)
    stats = store_stats(path)
    want = _numpy_candidate_stats(path)
    for dr in schema.DIRECTIONS:
        for short in LOGIT_FIELDS:
            for what in ("top1", "entropy"):
                assert stats["candidates"][dr][short][what] == pytest.approx(want[dr][short][what], rel=1e-9)
        assert stats["candidates"][dr]["topk_mass"] == pytest.approx(want[dr]["topk_mass"], rel=1e-6)
        # K < P, so the candidates hold part of the mass, but never more than all of it
        assert 0.0 < stats["candidates"][dr]["topk_mass"] <= 1.0 + 1e-6
    assert stats["shards"] == [
        {"shard": "00000", "rows": 12, "rejected": 2, "pools": 3},
        {"shard": "00001", "rows": 6, "rejected": 2, "pools": 2},
        {"shard": "00002", "rows": 12, "rejected": 2, "pools": 3},
    ]
    assert (stats["rows"], stats["rejected"], stats["pools"]) == (30, 6, 8)
    assert stats["rejects_by_reason"] == {"decode_error": 6}
    assert stats["teachers"] == Manifest.load(path).teachers
    assert stats["params"]["pool_size"] == 5 and stats["unfinished_shards"] == []


def test_stats_of_a_store_with_no_finished_shard(tmp_path, make_store):
    path = make_store(tmp_path / "s", shards=0)
    stats = store_stats(path)
    assert stats["rows"] == 0 and stats["shards"] == [] and stats["rejects_by_reason"] == {}
    assert stats["candidates"]["i2t"]["dual"]["top1"] is None


def test_views_signals_rejects_shards(tmp_path, make_store):
    path = make_store(tmp_path / "s")
    con = connect(path)
    assert con.sql(f"SELECT {schema.SHARD}, count(*) FROM signals GROUP BY ALL ORDER BY 1").fetchall() == [
        ("00000", 10), ("00001", 7)]
    rejected = con.sql(f"SELECT {schema.REJECT_KEY}, {schema.SHARD} FROM rejects ORDER BY 1").fetchall()
    assert [shard for _, shard in rejected] == ["00000", "00001"]
    assert rejected[0][0] in open_store(path).rejected_keys("00000")
    assert con.sql("SELECT shard, rows, rejected, status FROM shards ORDER BY 1").fetchall() == [
        ("00000", 10, 1, "done"), ("00001", 7, 1, "done")]


def test_sql_errors_become_one_line_input_errors(tmp_path, make_store):
    con = connect(make_store(tmp_path / "s"))
    with pytest.raises(InputError, match=r"^SQL error: .*nope") as err:
        sql(con, "SELECT nope FROM signals")
    assert "\n" not in str(err.value)
    assert sql(con, "SELECT * FROM signals", limit=3).fetchall().__len__() == 3


def test_check_store_accepts_a_valid_store(tmp_path, make_store):
    path = make_store(tmp_path / "s")
    assert check_store(path) == {"shards": 2, "rows": 17, "rejected": 2, "pools": 5}


def _rewrite(path, shard, change) -> None:
    """Rewrite a signals file with one column changed, keeping schema and row groups (footers still agree)."""
    f = signals_path(path, shard)
    table = pq.read_table(f)
    name, values = change(table)
    field = table.schema.field(name)
    table = table.set_column(table.schema.get_field_index(name), field, values.cast(field.type))
    pq.write_table(table, f)


@pytest.mark.parametrize("change, problem", [
    (lambda t: (schema.POOL, pc.add(t[schema.POOL], 1)), "pool is not row // 4"),
    (lambda t: (schema.ROW, pa.array(np.arange(t.num_rows)[::-1], pa.int32())), "rows are not 0..n-1"),
    (lambda t: (schema.KEY, pa.array(["same"] * t.num_rows)), "duplicate keys"),
    (lambda t: (schema.SHARD, pa.array(["other"] * t.num_rows)), "shard column differs"),
    (lambda t: (schema.col("t2i", schema.IDX), pa.array([[schema.PAD_IDX] * 3] * t.num_rows, t.schema.field(
        schema.col("t2i", schema.IDX)).type)), "t2i_idx lacks the positive"),
])
def test_check_store_catches_rows_that_break_the_contract(tmp_path, make_store, change, problem):
    path = make_store(tmp_path / "s")
    _rewrite(path, "00001", change)
    open_store(path)  # the footers alone do not see it
    with pytest.raises(InputError, match=f"shard 00001: .*{problem}"):
        check_store(path)


def test_check_store_catches_a_rejects_file_of_another_schema(tmp_path, make_store):
    path = make_store(tmp_path / "s")
    f = rejects_path(path, "00000")
    pq.write_table(pq.read_table(f).append_column("extra", pa.array(["x"])), f)
    with pytest.raises(InputError, match="shard 00000: rejects file has columns"):
        check_store(path)


def test_check_store_catches_a_count_mismatch(tmp_path, make_store):
    path = make_store(tmp_path / "s")
    m = Manifest.load(path)
    m.shards["00000"]["rows"] = 11
    m.save(path)
    with pytest.raises(InputError, match="shard 00000: files hold 10 rows, the manifest says 11"):
        check_store(path)


def _tar_order(store, shard) -> list[str]:
    kept = pq.read_table(signals_path(store.path, shard), columns=[schema.KEY])[schema.KEY].to_pylist()
    return sorted(kept + sorted(store.rejected_keys(shard)))  # fixture keys sort in tar order


def test_check_data_keys(tmp_path, make_store):
    store = open_store(make_store(tmp_path / "s"))
    keys = _tar_order(store, "00000")
    assert check_data_keys(store, "00000", keys) == {"kept": 10, "rejected": 1}
    kept = [k for k in keys if k not in store.rejected_keys("00000")]
    swapped = keys.copy()
    i, j = keys.index(kept[0]), keys.index(kept[1])
    swapped[i], swapped[j] = swapped[j], swapped[i]
    for bad, msg in [(keys[:-1], "not in the data"), (keys + ["zzz"], "key 'zzz'"),
                     (swapped, f"has key {kept[1]!r}"), (keys[1:] + keys[:1], "")]:
        with pytest.raises(InputError, match=f"shard 00000: .*{msg}"):
            check_data_keys(store, "00000", bad)


def test_check_data_keys_matches_a_duplicate_as_kept_then_rejected(tmp_path, make_columns):
    # The data reader keeps a key's first occurrence and rejects the repeat under the same key.
    cols = make_columns("00000", 5, pool=4)
    keys = cols[schema.KEY]
    write_shard(tmp_path, "00000", cols, [(keys[1], "duplicate_key", "seen before")], d=8, f=12, k=3, pool_size=4)
    m = Manifest(params={"pool_size": 4, "k": 3, "d": 8, "f": 12})
    m.record_shard("00000", {"source": "x.tar", "size": 1, "mtime": 0.0, "rows": 5, "rejected": 1,
                             "pools": 2, "seconds": 0.0, "status": STATUS_DONE})
    m.save(tmp_path)
    store = open_store(tmp_path)
    data = keys[:2] + [keys[1]] + keys[2:]
    assert check_data_keys(store, "00000", data) == {"kept": 5, "rejected": 1}
    with pytest.raises(InputError, match="rejected key .* not in the data"):
        check_data_keys(store, "00000", keys)
    with pytest.raises(InputError, match="neither kept next nor rejected"):
        check_data_keys(store, "00000", data + [keys[1]])
