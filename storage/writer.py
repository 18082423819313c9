"""Write one input shard's signals and rejects as Parquet, crash-safely.

The teacher pass calls `write_shard` once per input shard, then records the
shard in the manifest. Files are written under a temporary name and renamed
into place (storage/atomic.py; at a URI, one whole upload each): the rejects
file first, then a store with views (schema v2) writes the view file, and the
signals file last, so a signals file under its final name is always complete
and implies its other files exist; when a later write fails (read-only
folder, full disk), the files written before it are removed again.

Every page carries a CRC-32 checksum (Parquet's page checksum), which every
reader verifies (storage/parquet_files.parquet_file); the manifest holds each file's
sha256 (write_shard returns it), which also covers footers and page headers.

Layout choice (measured, 2048 rows, zstd): row groups hold whole pools, at
least ROW_GROUP_MIN_ROWS rows. One row group per pool costs ~1.2 KiB of
footer per pool (+13 % file size at D=64, P=32; +1 % at D=512, P=64) and
reads 2-3x slower sequentially, which is how the student streams a shard
beside its tar. A reader still fetches any pool alone (it decodes the row
group holding it), and never holds more than one row group per open file.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.manifest import (
    REJECTS_DIR, SIGNALS_BYTES, SIGNALS_DIR, VIEWS_DIR, file_record, rejects_path, signals_path, views_path,
)

COMPRESSION = "zstd"
ROW_GROUP_MIN_ROWS = 256
# Only the small scalar columns get statistics and dictionaries: they let DuckDB
# skip row groups by shard/row/pool; stats on list columns would only bloat the footer.
_STATS_COLUMNS = [schema.SHARD, schema.ROW, schema.POOL]
_VIEW_STATS_COLUMNS = [schema.SHARD, schema.ROW, schema.VIEW]
_DICT_COLUMNS = [schema.SHARD]

_VECTOR_COLUMNS = {schema.IMG_EMB: "d", schema.TXT_EMB: "d", schema.FUSED: "f", schema.FUSED_PROJ: "d"}
_SCALAR_COLUMNS = [schema.ITM_POS] + [schema.col(dr, schema.DUAL_LSE) for dr in schema.DIRECTIONS]
_CAND_COLUMNS = [schema.col(dr, fld) for dr in schema.DIRECTIONS for fld in (schema.IDX, schema.DUAL, schema.ITM)]


def write_shard(
    store: str | os.PathLike,
    shard: str,
    columns: Mapping[str, np.ndarray | list],
    rejects: Sequence[tuple[str, str, str]],
    *,
    d: int,
    f: int,
    k: int,
    pool_size: int,
    views: Mapping[str, Any] | None = None,
    n_views: int = 1,
    single_views: int = 1,
) -> dict[str, Any]:
    """Write signals/<shard>.parquet and rejects/<shard>.parquet; return {"rows", "rejected", "pools",
    "bytes"} plus the files' digest fields for the manifest entry (manifest.FILE_DIGEST_FIELDS).

    With `n_views` > 1 (schema v2), `views` holds the view columns (storage.schema.VIEW_COLUMNS;
    SHARD may be left out) of every kept row and view 1..n_views-1, rows in (row, view) order,
    the single-teacher columns NaN or anything where view >= `single_views` (stored as null);
    views/<shard>.parquet is written before the signals file, and its digest fields
    (manifest.VIEW_DIGEST_FIELDS) are returned too.

    `columns` holds every signal column of storage.schema (SHARD may be left
    out: it is filled with `shard`), one entry per kept row: vectors as (n, D)
    or (n, F) arrays, candidate lists as (n, K), scalars as (n,). Rows must be
    0..n-1, pools row // pool_size, candidates inside the row's own pool with
    the positive included, padded with PAD_IDX / -inf only where the pool has
    fewer than K rows. Inconsistent columns raise ValueError (a bug in the
    caller, not bad user input); nothing is written then.
    """
    table = build_table(shard, columns, d=d, f=f, k=k, pool_size=pool_size)
    rejects_table = build_rejects(rejects)
    view_table = None
    if n_views > 1:
        if views is None:
            raise ValueError(f"shard {shard}: {n_views} views per sample but no view columns")
        view_table = build_view_table(shard, views, table, n_views=n_views, single_views=single_views, d=d, k=k)
    elif views is not None:
        raise ValueError(f"shard {shard}: view columns given for a store of one view per sample")

    written = []
    try:
        fs.write_file(rejects_path(store, shard), lambda sink: pq.write_table(
            rejects_table, sink, compression=COMPRESSION, write_page_checksum=True))
        written.append(rejects_path(store, shard))
        if view_table is not None:
            fs.write_file(views_path(store, shard), lambda sink: pq.write_table(
                view_table, sink, compression=COMPRESSION, row_group_size=row_group_rows(pool_size) * (n_views - 1),
                use_dictionary=_DICT_COLUMNS, write_statistics=_VIEW_STATS_COLUMNS, write_page_checksum=True))
            written.append(views_path(store, shard))
        fs.write_file(signals_path(store, shard), lambda sink: pq.write_table(
            table, sink, compression=COMPRESSION, row_group_size=row_group_rows(pool_size),
            use_dictionary=_DICT_COLUMNS, write_statistics=_STATS_COLUMNS, write_page_checksum=True))
    except BaseException:
        # A failed shard leaves no file of its own (a rejects file alone would
        # look like half a shard); a rerun writes them all again.
        for path in written:
            fs.remove(path)
        raise
    # Digests of the files as they now lie, for the manifest entry (hashed back from the
    # store, not from memory, so they vouch for what readers will get).
    records = {**file_record(rejects_path(store, shard), REJECTS_DIR),
               **file_record(signals_path(store, shard), SIGNALS_DIR)}
    if view_table is not None:
        records.update(file_record(views_path(store, shard), VIEWS_DIR))
    n = table.num_rows
    return {
        "rows": n,
        "rejected": rejects_table.num_rows,
        "pools": -(-n // pool_size),
        "bytes": records[SIGNALS_BYTES],
        **records,
    }


def row_group_rows(pool_size: int) -> int:
    """Rows per Parquet row group: a whole number of pools, at least ROW_GROUP_MIN_ROWS."""
    return pool_size * -(-ROW_GROUP_MIN_ROWS // pool_size)


def build_rejects(rejects: Sequence[tuple[str, str, str]]) -> pa.Table:
    rows = [tuple(r) for r in rejects]
    bad = [r for r in rows if len(r) != 3 or not all(isinstance(x, str) for x in r)]
    if bad:
        raise ValueError(f"rejects must be (key, reason, detail) string triples, got {bad[0]!r}")
    names = schema.REJECTS_SCHEMA.names
    arrays = [pa.array([r[i] for r in rows], pa.string()) for i in range(3)]
    return pa.Table.from_arrays(arrays, names=names).cast(schema.REJECTS_SCHEMA)


def build_table(
    shard: str, columns: Mapping[str, Any], *, d: int, f: int, k: int, pool_size: int
) -> pa.Table:
    """Validate `columns` and return them as an Arrow table of the v1 signal schema."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be positive, got {pool_size}")
    table_schema = schema.signal_schema(d=d, f=f, k=k)
    cols = dict(columns)
    if schema.KEY not in cols:
        raise ValueError(f"shard {shard}: missing column {schema.KEY}")
    n = len(cols[schema.KEY])
    cols.setdefault(schema.SHARD, [shard] * n)
    missing = [c for c in schema.SIGNAL_COLUMNS if c not in cols]
    extra = [c for c in cols if c not in schema.SIGNAL_COLUMNS]
    if missing or extra:
        raise ValueError(f"shard {shard}: missing columns {missing}, unknown columns {extra}")
    if any(s != shard for s in cols[schema.SHARD]):
        raise ValueError(f"shard {shard}: column {schema.SHARD} holds other shard names")
    if not all(isinstance(x, str) for x in cols[schema.KEY]):
        raise ValueError(f"shard {shard}: keys must be strings")

    widths = {"d": d, "f": f}
    arr = {schema.KEY: cols[schema.KEY], schema.SHARD: cols[schema.SHARD]}
    arr[schema.ROW] = _shaped(shard, schema.ROW, cols[schema.ROW], (n,), np.int32)
    arr[schema.POOL] = _shaped(shard, schema.POOL, cols[schema.POOL], (n,), np.int32)
    for name, w in _VECTOR_COLUMNS.items():
        arr[name] = _shaped(shard, name, cols[name], (n, widths[w]), np.float16)
    for name in _SCALAR_COLUMNS:
        arr[name] = _shaped(shard, name, cols[name], (n,), np.float32)
    for name in _CAND_COLUMNS:
        dtype = np.int32 if name.endswith(schema.IDX) else np.float32
        arr[name] = _shaped(shard, name, cols[name], (n, k), dtype)

    _check_rows(shard, arr, n=n, k=k, pool_size=pool_size)
    arrays = [_to_arrow(arr[field.name], field.type) for field in table_schema]
    return pa.Table.from_arrays(arrays, schema=table_schema)


def build_view_table(shard: str, columns: Mapping[str, Any], signals: pa.Table, *, n_views: int,
                     single_views: int, d: int, k: int) -> pa.Table:
    """Validate view columns against their shard's signals table; return them as a view table (schema v2).

    Rows must be (row, view) for every kept row and view 1..n_views-1 in that
    order, keys those of the signals rows, boxes inside [0, 1] with x0 < x1 and
    y0 < y1, vectors finite; where view < single_views the single teacher's
    columns must be finite except -inf exactly at the row's candidate padding,
    and they are stored as null elsewhere. ValueError on any violation.
    """
    if not 1 <= single_views <= n_views:
        raise ValueError(f"shard {shard}: need 1 <= single_views <= n_views, got {single_views}, {n_views}")
    cols = dict(columns)
    n_rows, per = signals.num_rows, n_views - 1
    n = n_rows * per
    cols.setdefault(schema.SHARD, [shard] * len(cols.get(schema.KEY, [])))
    missing = [c for c in schema.VIEW_COLUMNS if c not in cols]
    extra = [c for c in cols if c not in schema.VIEW_COLUMNS]
    if missing or extra:
        raise ValueError(f"shard {shard}: view table lacks columns {missing}, has unknown columns {extra}")
    if len(cols[schema.KEY]) != n:
        raise ValueError(f"shard {shard}: {len(cols[schema.KEY])} view rows, expected {n_rows} rows x {per} views")
    where = f"shard {shard}: view table"
    rows = _shaped(shard, schema.ROW, cols[schema.ROW], (n,), np.int32)
    views = _shaped(shard, schema.VIEW, cols[schema.VIEW], (n,), np.int32)
    if not (np.array_equal(rows, np.repeat(np.arange(n_rows), per))
            and np.array_equal(views, np.tile(np.arange(1, n_views), n_rows))):
        raise ValueError(f"{where}: rows must be each kept row's views 1..{per} in order")
    keys = signals.column(schema.KEY).to_pylist()
    if list(cols[schema.KEY]) != [keys[r] for r in rows] or any(s != shard for s in cols[schema.SHARD]):
        raise ValueError(f"{where}: keys or shard names differ from the signals rows")
    box = _shaped(shard, schema.BOX, cols[schema.BOX], (n, schema.BOX_WIDTH), np.float32)
    if n and not ((box[:, :2] >= 0).all() and (box[:, 2:] <= 1).all() and (box[:, :2] < box[:, 2:]).all()):
        raise ValueError(f"{where}: boxes must lie inside [0, 1] with x0 < x1 and y0 < y1")
    arr = {schema.KEY: list(cols[schema.KEY]), schema.SHARD: list(cols[schema.SHARD]), schema.ROW: rows,
           schema.VIEW: views, schema.BOX: box,
           schema.IMG_EMB: _shaped(shard, schema.IMG_EMB, cols[schema.IMG_EMB], (n, d), np.float16)}
    scored = views < single_views
    nulls = {}
    for name, width in ((schema.FUSED_PROJ, d), (schema.ITM_POS, None)):
        shape = (n,) if width is None else (n, width)
        value = np.asarray(cols[name], dtype=np.float16 if width else np.float32)
        if value.shape != shape:
            raise ValueError(f"{where}: column {name} has shape {value.shape}, expected {shape}")
        ok = np.isfinite(value) if width is None else np.isfinite(value).all(axis=1)
        if not ok[scored].all():
            raise ValueError(f"{where}: column {name} must be finite where view < {single_views}")
        arr[name], nulls[name] = value, ~scored
    for dr in schema.DIRECTIONS:
        name = schema.col(dr, schema.ITM)
        value = np.asarray(cols[name], dtype=np.float32)
        if value.shape != (n, k):
            raise ValueError(f"{where}: column {name} has shape {value.shape}, expected {(n, k)}")
        idx = signals.column(schema.col(dr, schema.IDX)).combine_chunks().flatten().to_numpy()
        pad = idx.reshape(n_rows, k)[rows] == schema.PAD_IDX
        if not np.where(pad, np.isneginf(value), np.isfinite(value))[scored].all():
            raise ValueError(f"{where}: column {name} must be finite where view < {single_views}, "
                             f"and -inf exactly at the row's candidate padding")
        arr[name], nulls[name] = value, ~scored
    view_schema = schema.view_schema(d=d, k=k)
    arrays = [_to_arrow(arr[field.name], field.type, null=nulls.get(field.name)) for field in view_schema]
    return pa.Table.from_arrays(arrays, schema=view_schema)


def _shaped(shard: str, name: str, value: Any, shape: tuple[int, ...], dtype) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != shape:
        raise ValueError(f"shard {shard}: column {name} has shape {a.shape}, expected {shape}")
    if np.issubdtype(dtype, np.integer):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"shard {shard}: column {name} must be integers, got {a.dtype}")
        return a.astype(dtype)
    out = a.astype(dtype)
    finite_only = not any(name.endswith(fld) for fld in (schema.DUAL, schema.ITM))
    if finite_only and not np.isfinite(out).all():
        raise ValueError(f"shard {shard}: column {name} holds non-finite values")
    return out


def _check_rows(shard: str, arr: dict[str, np.ndarray], *, n: int, k: int, pool_size: int) -> None:
    """Rows 0..n-1, pools row // P, candidates in the own pool, positive included, padding only when due."""
    rows = arr[schema.ROW]
    if not np.array_equal(rows, np.arange(n)):
        raise ValueError(f"shard {shard}: column {schema.ROW} must be 0..{n - 1} in order")
    if not np.array_equal(arr[schema.POOL], rows // pool_size):
        raise ValueError(f"shard {shard}: column {schema.POOL} must equal {schema.ROW} // {pool_size}")
    start = (rows // pool_size) * pool_size
    pool_len = np.minimum(start + pool_size, n) - start
    for dr in schema.DIRECTIONS:
        idx, dual, itm = (arr[schema.col(dr, fld)] for fld in (schema.IDX, schema.DUAL, schema.ITM))
        pad = idx == schema.PAD_IDX
        inside = (idx >= start[:, None]) & (idx < (start + pool_len)[:, None])
        where = f"shard {shard}: column {schema.col(dr, schema.IDX)}"
        if not (pad | inside).all():
            bad = int(np.argwhere(~(pad | inside))[0, 0])
            raise ValueError(f"{where}: row {bad} has candidates outside its pool")
        if not np.array_equal((~pad).sum(axis=1), np.minimum(pool_len, k)):
            raise ValueError(f"{where}: each row needs min(K, pool size) real candidates")
        if n and not (idx == rows[:, None]).any(axis=1).all():
            raise ValueError(f"{where}: every row's positive must be among its candidates")
        for fld, logits in ((schema.DUAL, dual), (schema.ITM, itm)):
            if not (np.isfinite(logits[~pad]).all() and np.isneginf(logits[pad]).all()):
                raise ValueError(f"shard {shard}: column {schema.col(dr, fld)} must be finite, "
                                 f"and -inf exactly where {schema.col(dr, schema.IDX)} is padding")


def _to_arrow(value: Any, typ: pa.DataType, null: np.ndarray | None = None) -> pa.Array:
    """A column as Arrow; `null` (bool per row) marks rows stored as null (their values are not kept)."""
    if null is not None and null.any():
        value = np.where(null.reshape((-1,) + (1,) * (np.ndim(value) - 1)), 0, value).astype(np.asarray(value).dtype)
    if pa.types.is_fixed_size_list(typ):
        flat = pa.array(np.ascontiguousarray(value).reshape(-1), type=typ.value_type)
        mask = None if null is None else pa.array(null, pa.bool_())
        return pa.FixedSizeListArray.from_arrays(flat, typ.list_size, mask=mask)
    if pa.types.is_string(typ):
        return pa.array(list(value), type=typ)
    return pa.array(value, type=typ, mask=null)
