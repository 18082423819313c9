"""Write one input shard's signals and rejects as Parquet, crash-safely.

The teacher pass calls `write_shard` once per input shard, then records the
shard in the manifest. Files are written under a temporary name and renamed
into place (storage/atomic.py; at a URI, one whole upload each): the rejects
file first, the signals file last, so a signals file under its final name is
always complete and implies its rejects file exists; when the signals write
fails (read-only folder, full disk), the rejects file is removed again.

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
    REJECTS_DIR, SIGNALS_BYTES, SIGNALS_DIR, file_record, rejects_path, signals_path,
)

COMPRESSION = "zstd"
ROW_GROUP_MIN_ROWS = 256
# Only the small scalar columns get statistics and dictionaries: they let DuckDB
# skip row groups by shard/row/pool; stats on list columns would only bloat the footer.
_STATS_COLUMNS = [schema.SHARD, schema.ROW, schema.POOL]
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
) -> dict[str, Any]:
    """Write signals/<shard>.parquet and rejects/<shard>.parquet; return {"rows", "rejected", "pools",
    "bytes"} plus the files' digest fields for the manifest entry (manifest.FILE_DIGEST_FIELDS).

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

    fs.write_file(rejects_path(store, shard), lambda sink: pq.write_table(
        rejects_table, sink, compression=COMPRESSION, write_page_checksum=True))
    try:
        fs.write_file(signals_path(store, shard), lambda sink: pq.write_table(
            table, sink, compression=COMPRESSION, row_group_size=row_group_rows(pool_size),
            use_dictionary=_DICT_COLUMNS, write_statistics=_STATS_COLUMNS, write_page_checksum=True))
    except BaseException:
        # A failed shard leaves no file of its own (a rejects file alone would
        # look like half a shard); a rerun writes both again.
        fs.remove(rejects_path(store, shard))
        raise
    # Digests of the files as they now lie, for the manifest entry (hashed back from the
    # store, not from memory, so they vouch for what readers will get).
    records = {**file_record(rejects_path(store, shard), REJECTS_DIR),
               **file_record(signals_path(store, shard), SIGNALS_DIR)}
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


def _to_arrow(value: Any, typ: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(typ):
        flat = pa.array(np.ascontiguousarray(value).reshape(-1), type=typ.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, typ.list_size)
    if pa.types.is_string(typ):
        return pa.array(list(value), type=typ)
    return pa.array(value, type=typ)
