"""The checks of `mcad signals validate` that read a store's rows, with DuckDB.

- `check_store`: the rows against the contract of storage/writer.py, beyond
  what `open_store` reads from the footers (shard names, row order, pools,
  candidates in their pool with the positive, unique keys; rejects' schema);
- `check_views`: a store with views: every kept row has its N-1 views in
  order, keys match, boxes lie inside [0, 1], the single teacher's columns
  are null exactly at views >= M;
- `check_data_keys`: one shard's keys against the keys of its input data.

Digests and page checksums are storage/integrity.py's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import duckdb
import pyarrow.parquet as pq

from mcad.storage import schema
from mcad.storage.errors import InputError, error_line
from mcad.storage.manifest import SIGNALS_DIR, rejects_path, signals_path, store_file, views_path
from mcad.storage.query import REJECTS_VIEW, SIGNALS_VIEW, connect, fetch_rows, file_list
from mcad.storage.reader import Store, open_store


def check_store(store: Store | str | os.PathLike) -> dict[str, int]:
    """Check a store beyond its footers; return {"shards", "rows", "rejected", "pools"} or raise InputError.

    `open_store` (strict: every shard finished) already checks the manifest,
    the files present, the signals schema, dims and counts against the
    manifest. Here: the rejects files' schema, and per shard, from the rows:
    the shard column names the file, rows are 0..n-1 in file order, pools are
    row // P, candidates lie in the row's own pool with the positive
    included, and no key appears twice among the kept rows.
    """
    store = store if isinstance(store, Store) else open_store(store)
    want = schema.REJECTS_SCHEMA
    for name in store.shards:
        got = pq.read_schema(rejects_path(store.path, name))
        if got.names != want.names or got.types != want.types:
            raise InputError(f"{store.path}: shard {name}: rejects file has columns "
                             f"{dict(zip(got.names, map(str, got.types)))}, expected "
                             f"{dict(zip(want.names, map(str, want.types)))}")
    con = connect(store)
    if store.shards:
        files = [signals_path(store.path, name) for name in store.shards]
        try:
            bad = fetch_rows(con.sql(_row_checks_sql(files, store.pool_size)))
        except duckdb.Error as exc:  # a page that does not decode (--quick skips the page checksums)
            raise InputError(f"{store.path}: {error_line(exc, first=True)}") from None
        if bad:
            problems = [k for k, v in bad[0].items() if k != "file_shard" and v]
            raise InputError(f"{store.path}: shard {bad[0]['file_shard']}: {', '.join(problems)} "
                             f"({len(bad)} shard(s) with problems)")
    rows, pools = con.sql(f"SELECT count(*), count(DISTINCT ({schema.SHARD}, {schema.POOL})) "
                          f"FROM {SIGNALS_VIEW}").fetchall()[0]
    rejected = con.sql(f"SELECT count(*) FROM {REJECTS_VIEW}").fetchall()[0][0]
    return {"shards": len(store.shards), "rows": rows, "rejected": rejected, "pools": pools}


def _row_checks_sql(files: list[Path], pool_size: int) -> str:
    """One row per signals file with any problem; each problem a boolean column named by what is wrong."""
    here = "parse_filename(filename, true)"
    checks = {
        "shard column differs from the file name": f"bool_or({schema.SHARD} <> {here})",
        "rows are not 0..n-1 in file order": f"bool_or({schema.ROW} <> file_row_number)",
        f"pool is not row // {pool_size}": f"bool_or({schema.POOL} <> {schema.ROW} // {pool_size})",
        "duplicate keys": f"count(DISTINCT {schema.KEY}) <> count(*)",
    }
    for dr in schema.DIRECTIONS:
        idx = schema.col(dr, schema.IDX)
        checks[f"{idx} has candidates outside the row's pool"] = (
            f"bool_or(NOT list_bool_and(list_transform({idx}, "
            f"lambda j: j = {schema.PAD_IDX} OR j // {pool_size} = {schema.POOL})))")
        checks[f"{idx} lacks the positive"] = f"bool_or(NOT list_contains({idx}, {schema.ROW}))"
    cols = ", ".join(f'{expr} AS "{name}"' for name, expr in checks.items())
    anybad = " OR ".join(f'"{name}"' for name in checks)
    return (f"WITH c AS (SELECT {here} AS file_shard, {cols} "
            f"FROM read_parquet({file_list(files)}, filename = true, file_row_number = true) "
            f"GROUP BY filename) "
            f"SELECT * FROM c WHERE {anybad} ORDER BY file_shard")


def check_data_keys(store: Store, shard: str, data_keys: Iterable[str]) -> dict[str, int]:
    """Check that a shard's input keys, in order, are exactly its kept rows plus its rejects.

    Walks the data's keys in order: each must be the next kept key (kept rows
    are in data order; in a store of neighbour pools, any kept key not yet
    matched) or one of the rejected keys not yet matched (rejects
    are matched as a multiset: a duplicate key is kept once and rejected
    after). Anything left over on either side is an error. Returns
    {"kept", "rejected"} counts; raises InputError naming the first mismatch.
    """
    where = f"{store.path}: shard {shard}"
    kept = pq.read_table(signals_path(store.path, shard), columns=[schema.KEY]).column(schema.KEY).to_pylist()
    rejected: dict[str, int] = {}
    for key in pq.read_table(rejects_path(store.path, shard), columns=[schema.REJECT_KEY]).column(
            schema.REJECT_KEY).to_pylist():
        rejected[key] = rejected.get(key, 0) + 1
    total_rejected = sum(rejected.values())
    # Neighbour pools (issue #18): rows follow the pools, not the data, so a kept key matches wherever
    # its first occurrence comes; consecutive pools keep the data's order, checked row by row.
    unread = dict.fromkeys(kept) if store.pool_mode == schema.POOLS_NEIGHBOURS else None
    nxt = 0
    for pos, key in enumerate(data_keys):
        if unread is None and nxt < len(kept) and kept[nxt] == key:
            nxt += 1
        elif unread is not None and key in unread:
            del unread[key]
        elif rejected.get(key, 0) > 0:
            rejected[key] -= 1
        else:
            want = f"kept row {nxt} has key {kept[nxt]!r}" if nxt < len(kept) else "all kept rows are matched"
            if unread is not None:
                want = f"{len(unread)} kept rows are not matched yet"
            raise InputError(f"{where}: data sample {pos} has key {key!r}, which the store neither kept "
                             f"next nor rejected ({want})")
    if unread:
        first = next(iter(unread))
        raise InputError(f"{where}: kept row {kept.index(first)} (key {first!r}) and {len(unread) - 1} more "
                         f"are not in the data")
    if unread is None and nxt < len(kept):
        raise InputError(f"{where}: kept row {nxt} (key {kept[nxt]!r}) and {len(kept) - nxt - 1} more "
                         f"are not in the data")
    left = sorted(k for k, n in rejected.items() if n > 0)
    if left:
        raise InputError(f"{where}: rejected key {left[0]!r} and {len(left) - 1} more are not in the data")
    return {"kept": len(kept), "rejected": total_rejected}


def check_views(store) -> dict[str, int]:
    """Check every view file's rows; return {"views": N, "view_rows"} or raise InputError naming the shard.

    Per shard: N-1 rows per kept row, each row's views 1..N-1 in file order,
    keys equal to the signals file's at the same row, boxes inside [0, 1] with
    x0 < x1 and y0 < y1 (none missing, none NaN), and the single teacher's
    columns null exactly where view >= M.
    """
    n, m = store.manifest.num_views, store.manifest.single_views
    if n == 1 or not store.shards:
        return {"views": n, "view_rows": 0}
    per = n - 1
    here = "parse_filename(v.filename, true)"
    b = schema.BOX
    checks = {
        "shard column differs from the file name": f"bool_or(v.{schema.SHARD} <> {here})",
        f"rows do not hold views 1..{per} of each kept row in order":
            f"bool_or(v.{schema.ROW} <> v.file_row_number // {per} OR v.{schema.VIEW} <> v.file_row_number % {per} + 1)",
        "keys differ from the signals file's": f"bool_or(s.{schema.KEY} IS NULL OR s.{schema.KEY} <> v.{schema.KEY})",
        "a box lies outside [0, 1] or is empty": (
            f"bool_or(NOT coalesce({b}[1] >= 0 AND {b}[1] < {b}[3] AND {b}[3] <= 1 "
            f"AND {b}[2] >= 0 AND {b}[2] < {b}[4] AND {b}[4] <= 1, false))"),
        f"single-teacher columns are not null exactly at views >= {m}": " OR ".join(
            f"bool_or(({c} IS NULL) <> (v.{schema.VIEW} >= {m}))" for c in schema.VIEW_SINGLE_COLUMNS),
    }
    views = [views_path(store.path, s) for s in store.shards]
    signals = [store_file(store.path, SIGNALS_DIR, f"{s}.parquet") for s in store.shards]
    cols = ", ".join(f'{expr} AS "{name}"' for name, expr in checks.items())
    query = (f"SELECT {here} AS file_shard, count(*) AS n, {cols} "
             f"FROM read_parquet({file_list(views)}, filename = true, file_row_number = true) v "
             f"LEFT JOIN (SELECT {schema.SHARD}, {schema.ROW}, {schema.KEY} FROM read_parquet({file_list(signals)})) s "
             f"ON s.{schema.SHARD} = v.{schema.SHARD} AND s.{schema.ROW} = v.{schema.ROW} "
             f"GROUP BY v.filename ORDER BY file_shard")
    try:
        found = fetch_rows(duckdb.connect().sql(query))
    except duckdb.Error as exc:  # a page that does not decode (--quick skips the page checksums)
        raise InputError(f"{store.path}: {error_line(exc, first=True)}") from None
    counted = {r["file_shard"]: r for r in found}
    for name in store.shards:
        want = store.shard_rows[name] * per
        row = counted.get(name, {"n": 0})
        if row["n"] != want:
            raise InputError(f"{store.path}: shard {name}: view file holds {row['n']} rows, expected {want} "
                             f"({store.shard_rows[name]} rows x {per} views): a view is missing")
        problems = [k for k in checks if row.get(k)]
        if problems:
            raise InputError(f"{store.path}: shard {name}: view file: {', '.join(problems)}")
    return {"views": n, "view_rows": sum(r["n"] for r in found)}
