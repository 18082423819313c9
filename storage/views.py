"""The view table of a schema v2 store: checks, reads, stats (docs/design.md, section 4, views).

A store with views holds, beside each shard's signals file (view 0, the whole
image), `views/<shard>.parquet`: one row per kept sample and view 1..N-1, in
(row, view) order, with the view's box and the teachers' outputs on it
(storage/schema.py: `view_schema`). The manifest's `views` field is its
recipe (N, M, crop ranges, seed, box rule and Pillow versions).

- `check_view_file`: from the footer, at `open_store`: schema, widths, and
  N-1 rows per kept row;
- `view_arrays`: a pool's view rows as arrays shaped (rows, views, ...), for the
  reader to attach to the pool under `schema.view_key(column)`;
- `view_stats`: views per sample and store bytes per sample by table.

The rows themselves are checked with DuckDB by storage/checks.py
(`check_views`), their digests and pages by storage/integrity.py.

Storage never decodes images: cutting a view's pixels from its box is
pipeline/views.py's `apply_box`.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.batches import to_numpy
from mcad.storage.errors import InputError, error_line
from mcad.storage.manifest import (
    PARAM_D, PARAM_K, REJECTS_DIR, ROWS, SIGNALS_DIR, VIEWS_DIR, VIEW_CROP_RATIO, VIEW_CROP_SCALE, VIEW_SEED,
    Manifest, store_file, views_path,
)
from mcad.storage.parquet_files import parquet_file


def stable_id(name: str) -> int:
    """A non-negative 64-bit integer of a name that is the same in every process and run
    (sha256; Python's hash() of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def check_view_file(store, name: str, manifest: Manifest) -> np.ndarray:
    """Check one done shard's view file from its footer; return its row-group start rows (+ total)."""
    where = f"{store}: shard {name}"
    path = views_path(store, name)
    if not fs.is_file(path):
        raise InputError(f"{where}: manifest says done but {VIEWS_DIR}/{fs.name(path)} is missing "
                         f"(the store has {manifest.num_views} views per sample)")
    try:
        with parquet_file(path) as pf:
            meta, arrow_schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: unreadable Parquet file ({error_line(exc)})") from None
    dims = schema.validate_views(arrow_schema.empty_table(), where=f"{where} (view file)")
    want = {"d": manifest.params[PARAM_D], "k": manifest.params[PARAM_K]}
    if dims != want:
        raise InputError(f"{where}: view file has dims {dims}, the manifest says {want}")
    expected = manifest.shards[name][ROWS] * (manifest.num_views - 1)
    if meta.num_rows != expected:
        raise InputError(f"{where}: view file holds {meta.num_rows} rows, expected {expected} "
                         f"({manifest.shards[name][ROWS]} rows x {manifest.num_views - 1} views): a view is missing")
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def view_arrays(table: pa.Table, *, rows: np.ndarray, n: int, m: int, where: str) -> dict[str, np.ndarray]:
    """The view rows of consecutive sample rows `rows` as {view_key(column): array}.

    `table` holds exactly those rows' views, in (row, view) order. BOX and
    IMG_EMB come as (len(rows), n-1, width); the single teacher's columns only
    for the views it scored, (len(rows), m-1[, width]). InputError when the
    rows or views are not the expected ones (a damaged store).
    """
    per = n - 1
    got_rows = table.column(schema.ROW).to_numpy()
    got_views = table.column(schema.VIEW).to_numpy()
    if not (np.array_equal(got_rows, np.repeat(rows, per)) and np.array_equal(got_views, np.tile(np.arange(1, n), len(rows)))):
        raise InputError(f"{where}: rows {int(rows[0]) if len(rows) else 0}.. do not have their views 1..{per} in order")
    out: dict[str, np.ndarray] = {}
    for name, value in to_numpy(table.select([schema.BOX, schema.IMG_EMB])).items():
        out[schema.view_key(name)] = value.reshape(len(rows), per, -1)
    scored = np.flatnonzero(got_views < m)
    single = table.select(list(schema.VIEW_SINGLE_COLUMNS)).take(scored)
    for name in single.column_names:
        if single.column(name).null_count:
            raise InputError(f"{where}: column {name} is null for a view the single teacher scored")
    for name, value in to_numpy(single).items():
        out[schema.view_key(name)] = value.reshape((len(rows), m - 1) + value.shape[1:])
    return out


# --- validation, integrity and stats (DuckDB and pyarrow over the files) ------------------


def view_stats(store) -> dict[str, Any]:
    """{"views": {"per_sample", "single_scored", "crop_scale", "crop_ratio", "seed"},
    "bytes_per_sample": {"signals", "views", "rejects", "total"}} over the done shards.

    Bytes are the files' sizes divided by the kept rows (None without rows); a
    store without views has 1 view per sample and 0 view bytes.
    """
    m = store.manifest
    recipe = m.views or {}
    views = {"per_sample": m.num_views, "single_scored": m.single_views,
             **{k: recipe.get(key) for k, key in (("crop_scale", VIEW_CROP_SCALE), ("crop_ratio", VIEW_CROP_RATIO),
                                                    ("seed", VIEW_SEED))}}
    sizes = {folder: sum(fs.size_and_mtime(store_file(store.path, folder, f"{s}.parquet"))[0] for s in store.shards)
             if folder != VIEWS_DIR or m.num_views > 1 else 0 for folder in (SIGNALS_DIR, VIEWS_DIR, REJECTS_DIR)}
    sizes["total"] = sum(sizes.values())
    rows = store.num_rows
    return {"views": views,
            "bytes_per_sample": {k: (v / rows if rows else None) for k, v in sizes.items()}}
