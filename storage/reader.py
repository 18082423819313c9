"""Stream a signal store: checked opening, pool replay and row remix.

`open_store(path)` checks the store against its manifest (schema version,
files present, no orphans, row counts) from Parquet footers only, then:

- `iter_pools`: one dict per pool (replay mode), in shard order or shuffled
  at pool granularity, split over (rank, worker) slots;
- `iter_rows`: batches of rows shuffled across pools through a bounded
  buffer (remix mode).

The same joined with the data (the decoded samples attached under
`schema.DATA`, read side by side with each shard's tar) are
storage/data_join.py's `iter_joined_pools` / `iter_joined_rows`, built on
this module's file handling (`_Files`) and slot split.

Batches are dicts keyed by schema column names: fixed-size lists as 2-D
numpy arrays (n, width) of their stored dtype, scalars as 1-D arrays,
strings (and DATA) as lists. Memory stays bounded: one row group per open
file (at most _OPEN_FILES files), plus the shuffle buffers the caller sizes.
Every split hands each pool (row) to exactly one slot per epoch; the global
order depends only on (seed, epoch), so all slots agree on it without
talking. Storage never imports torch: callers pass worker ids themselves.

Integrity: every page read verifies its checksum, and a Store hashes each
file the first time it opens it and compares it with the manifest's sha256
(`verify_file`; `verify_files` does them all at once): a damaged file stops
the reader with one line naming the store, the shard and the column.

Views (schema v2): a store with N > 1 views per sample also checks each
shard's view file at opening, and with `views=True` the iterators attach a
pool's view rows under `schema.view_key(column)` (storage/views.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.atomic import TMP_PREFIX
from mcad.storage.batches import Batch, rebatch, to_numpy
from mcad.storage.errors import InputError, error_line
from mcad.storage.lock import incomplete_line
from mcad.storage.manifest import (
    FILE_DIGEST_FIELDS, MTIME, PARAM_D, PARAM_F, PARAM_K, PARAM_POOL_SIZE, POOLS, REJECTED, REQUIRED_PARAMS,
    ROWS, REJECTS_DIR, SIGNALS_DIR, SIZE, SOURCE, STATUS, STATUS_DONE, VIEW_DIGEST_FIELDS, VIEWS_DIR, Manifest,
    file_digest, pass_pool_mode, rejects_path, signals_path, store_file, verify_projection,
)
from mcad.storage.parquet_files import decode_file, parquet_file, read_checked
from mcad.storage.views import check_view_file, view_arrays

_OPEN_FILES = 4  # Parquet files kept open at once by one iterator (pool-shuffled replay)


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False) -> "Store":
    """Open and check a store; InputError (one line, naming the shard) on any mismatch.

    With allow_incomplete, shards whose manifest status is not "done" are
    left out (for inspecting a pass still running); otherwise they are refused.
    """
    path = path if fs.is_uri(path) else Path(path)
    manifest = Manifest.load(path)
    unfinished = sorted(n for n, e in manifest.shards.items() if e.get(STATUS) != STATUS_DONE)
    # "incomplete: N of M shards done; finish it with ..." (the pass records every planned shard at its
    # start); also when a pass has only just begun and has no params yet.
    if unfinished and (not allow_incomplete or not manifest.params):
        raise InputError(incomplete_line(path, manifest))
    params = manifest.params
    for key in REQUIRED_PARAMS:
        if not isinstance(params.get(key), int) or params[key] < 1:
            raise InputError(f"{path}: manifest params need a positive integer {key!r}, got {params.get(key)!r}")
    on_disk = {fs.name(p)[: -len(".parquet")] for p in fs.listdir(store_file(path, SIGNALS_DIR))
               if fs.name(p).endswith(".parquet") and not fs.name(p).startswith(TMP_PREFIX)}
    orphans = sorted(on_disk - set(manifest.shards))
    if orphans:
        raise InputError(f"{path}: shard {orphans[0]} has a signals file but no manifest entry "
                         f"({len(orphans)} such; an interrupted pass or files copied in)")
    names = manifest.done_shards()
    starts = {name: _check_shard(path, name, manifest) for name in names}
    view_starts = {name: check_view_file(path, name, manifest) for name in names} if manifest.num_views > 1 else {}
    return Store(path, manifest, names, starts, view_starts, pool_mode=pass_pool_mode(path))


def _check_shard(store: Path | str, name: str, manifest: Manifest) -> np.ndarray:
    """Check one done shard's files from their footers; return its row-group start rows (+ total)."""
    entry, params = manifest.shards[name], manifest.params
    where = f"{store}: shard {name}"
    spath, rpath = signals_path(store, name), rejects_path(store, name)
    for p, folder in ((spath, SIGNALS_DIR), (rpath, REJECTS_DIR)):
        if not fs.is_file(p):
            raise InputError(f"{where}: manifest says done but {folder}/{fs.name(p)} is missing")
    try:
        with parquet_file(spath) as pf:
            meta, arrow_schema = pf.metadata, pf.schema_arrow
        with parquet_file(rpath) as pf:
            rejected = pf.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: unreadable Parquet file ({error_line(exc)})") from None
    dims = schema.validate(arrow_schema.empty_table(), where=f"{where} (signals file)")
    want = {"d": params[PARAM_D], "f": params[PARAM_F], "k": params[PARAM_K]}
    if dims != want:
        raise InputError(f"{where}: signals file has dims {dims}, the manifest says {want}")
    pools = -(-meta.num_rows // params[PARAM_POOL_SIZE])
    for field, got in ((ROWS, meta.num_rows), (REJECTED, rejected), (POOLS, pools)):
        if entry.get(field) != got:
            raise InputError(f"{where}: files hold {got} {field}, the manifest says {entry.get(field)}")
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable id (sha256 of canonical JSON) of a fingerprint, for names and logs."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


class Store:
    """An opened, checked signal store. Iterators open files lazily and close them when done."""

    def __init__(self, path: Path, manifest: Manifest, shards: Sequence[str],
                 row_group_starts: dict[str, np.ndarray], view_group_starts: dict[str, np.ndarray] | None = None,
                 pool_mode: str = schema.POOLS_CONSECUTIVE):
        self.path = path
        # neighbours: each shard's rows are in pool order, not the input's (the join holds samples read ahead)
        self.pool_mode = pool_mode
        self.manifest = manifest
        self.shards: tuple[str, ...] = tuple(shards)
        params = manifest.params
        self.dims = {"d": params[PARAM_D], "f": params[PARAM_F], "k": params[PARAM_K]}
        self.pool_size: int = params[PARAM_POOL_SIZE]
        self._starts = {SIGNALS_DIR: row_group_starts, VIEWS_DIR: view_group_starts or {}}
        # Views per sample (view 0, the whole image, included) and views the single teacher scored.
        self.num_views, self.single_views = manifest.num_views, manifest.single_views
        self.views: dict[str, Any] | None = manifest.views  # the view recipe (None: no views)
        self.shard_rows = {n: int(manifest.shards[n][ROWS]) for n in self.shards}
        self.num_rows = sum(self.shard_rows.values())
        self._units = [(n, p) for n in self.shards for p in range(-(-self.shard_rows[n] // self.pool_size))]
        self.num_pools = len(self._units)
        self._verified: set[tuple[str, str]] = set()  # (shard, folder) whose file matched its digest
        # Page checksums and file digests checked as files are read; False only to measure their cost.
        self.verify = True

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, shards={len(self.shards)}, rows={self.num_rows}, pools={self.num_pools})"

    def fingerprint(self) -> dict[str, Any]:
        """What a student pins: schema version, teacher digests, pass params, per-shard source identity."""
        m = self.manifest
        fingerprint = {
            "schema_version": m.schema_version,
            "teachers": {role: {k: v for k, v in sorted(t.items()) if k.endswith("sha256")}
                         for role, t in sorted(m.teachers.items())},
            "params": m.params,
            "shards": {n: {k: m.shards[n][k] for k in (SOURCE, SIZE, MTIME)} for n in self.shards},
        }
        if m.views:  # a store without views keeps the fingerprint it always had
            fingerprint["views"] = m.views
        if self.pool_mode != schema.POOLS_CONSECUTIVE:  # so does a store of consecutive pools
            fingerprint[schema.PASS_POOLS] = self.pool_mode
        return fingerprint

    def rejected_keys(self, shard: str) -> set[str]:
        self.verify_file(shard, REJECTS_DIR)
        path = rejects_path(self.path, shard)
        with parquet_file(path) as pf:
            table = read_checked(pf, list(range(pf.metadata.num_row_groups)), [schema.REJECT_KEY],
                                 self.file_where(shard, REJECTS_DIR))
            return set(table.column(schema.REJECT_KEY).to_pylist())

    # --- integrity --------------------------------------------------------

    @property
    def has_digests(self) -> bool:
        """Whether the manifest records every shard's file digests (stores from 2026-12-01 on)."""
        return all(sha in self.manifest.shards[n] for n in self.shards for sha, _ in FILE_DIGEST_FIELDS.values())

    def file_where(self, shard: str, folder: str) -> str:
        """How messages name one of a shard's files: 'STORE: shard S: signals/S.parquet'."""
        return f"{self.path}: shard {shard}: {folder}/{shard}.parquet"

    def verify_files(self, shards: Sequence[str] | None = None) -> bool:
        """Check the shards' signals and rejects files against their manifest digests (all shards by
        default); False when the manifest records none (a store from before 2026-12-01)."""
        folders = [*FILE_DIGEST_FIELDS, *(VIEW_DIGEST_FIELDS if self.num_views > 1 else ())]
        for name in self.shards if shards is None else shards:
            for folder in folders:
                self.verify_file(name, folder)
        return self.has_digests

    def verify_file(self, shard: str, folder: str) -> None:
        """Check one file's size and sha256 against its manifest entry, once per Store.

        A mismatch raises InputError naming the store, the shard, the file and,
        when a page fails its checksum, the column; when every page decodes,
        the damage lies in the footer or a page header. Nothing to check when
        the entry records no digest.
        """
        if (shard, folder) in self._verified:
            return
        entry = self.manifest.shards[shard]
        sha_field, size_field = {**FILE_DIGEST_FIELDS, **VIEW_DIGEST_FIELDS}[folder]
        if sha_field in entry:
            path = store_file(self.path, folder, f"{shard}.parquet")
            where = self.file_where(shard, folder)
            size = fs.size_and_mtime(path)[0]
            if size != entry.get(size_field):
                raise InputError(f"{where}: {size} bytes, the manifest records {entry.get(size_field)} "
                                 f"({size_field}): the file changed after the pass; restore it or rerun "
                                 f"the teacher pass")
            if file_digest(path) != entry[sha_field]:
                decode_file(path, where)  # names the column when a page is at fault
                raise InputError(f"{where}: the file does not match its manifest {sha_field}; every page "
                                 f"decodes, so the footer or a page header is damaged: restore it or rerun "
                                 f"the teacher pass")
        self._verified.add((shard, folder))

    def verify_projection(self) -> bool:
        """Check fusion_proj.safetensors against the manifest's fusion_proj_sha256; False when none is recorded."""
        return verify_projection(self.path, self.manifest)

    # --- replay and remix ------------------------------------------------

    def iter_pools(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                   world_size: int = 1, worker: int = 0, num_workers: int = 1,
                   columns: Sequence[str] | None = None, views: bool = False) -> Iterator[Batch]:
        """Yield this slot's pools: all pools in shard order (or shuffled by seed+epoch), dealt round-robin;
        with `views` (a store of N > 1 views), each also holds its view rows (storage/views.py)."""
        slot, slots = _slot(rank, world_size, worker, num_workers)
        cols = _columns(columns)
        order = _order(len(self._units), shuffle, seed, epoch)[slot::slots]
        files = _Files(self)
        view_files = _Files(self, folder=VIEWS_DIR) if views and self.num_views > 1 else None
        try:
            for u in order:
                pool = files.pool(*self._units[u], cols)
                if view_files is not None:
                    pool.update(view_files.views(*self._units[u]))
                yield pool
        finally:
            files.close()
            if view_files is not None:
                view_files.close()

    def iter_rows(self, *, batch_size: int, buffer_size: int = 4096, shuffle: bool = True,
                  seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, worker: int = 0,
                  num_workers: int = 1, columns: Sequence[str] | None = None,
                  views: bool = False) -> Iterator[Batch]:
        """Yield batches of rows mixed across pools through a bounded buffer; the last may be smaller."""
        pools = self.iter_pools(shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                worker=worker, num_workers=num_workers, columns=columns, views=views)
        slot, _ = _slot(rank, world_size, worker, num_workers)
        rng = np.random.default_rng([seed, epoch, slot]) if shuffle else None
        return rebatch(pools, batch_size=batch_size, buffer_size=buffer_size, rng=rng)


class _Files:
    """Open Parquet files of one iterator (LRU-bounded), each caching its last row groups read.

    The signals files by default; folder=VIEWS_DIR: the view files, N-1 file rows per sample row."""

    def __init__(self, store: Store, max_open: int = _OPEN_FILES, folder: str = SIGNALS_DIR):
        self.store, self.max_open, self.folder = store, max_open, folder
        self.per_row = store.num_views - 1 if folder == VIEWS_DIR else 1
        self.open: OrderedDict[str, tuple[pq.ParquetFile, list]] = OrderedDict()

    def pool(self, shard: str, index: int, cols: list[str]) -> Batch:
        return to_numpy(self._table(shard, index, cols))

    def views(self, shard: str, index: int) -> Batch:
        """A pool's view rows as {view_key(column): (rows, views, ...) array} (storage/views.view_arrays)."""
        p = self.store.pool_size
        rows = np.arange(index * p, min((index + 1) * p, self.store.shard_rows[shard]))
        table = self._table(shard, index, list(schema.VIEW_COLUMNS))
        return view_arrays(table, rows=rows, n=self.store.num_views, m=self.store.single_views,
                          where=self.store.file_where(shard, VIEWS_DIR))

    def _table(self, shard: str, index: int, cols: list[str]) -> pa.Table:
        pf, cache = self._file(shard)
        p, per = self.store.pool_size, self.per_row
        lo, hi = index * p * per, min((index + 1) * p, self.store.shard_rows[shard]) * per
        starts = self.store._starts[self.folder][shard]
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left")) - 1
        groups = tuple(range(first, last + 1))
        if not cache or cache[0] != (groups, tuple(cols)):
            table = read_checked(pf, list(groups), cols, self.store.file_where(shard, self.folder))
            cache[:] = [(groups, tuple(cols)), table]
        table = cache[1].slice(lo - int(starts[first]), hi - lo)
        if table.num_rows != hi - lo:
            raise InputError(f"shard {shard}: pool {index} has {table.num_rows} {self.folder} rows, expected {hi - lo}")
        return table

    def _file(self, shard: str) -> tuple[pq.ParquetFile, list]:
        if shard in self.open:
            self.open.move_to_end(shard)
        else:
            while len(self.open) >= self.max_open:
                self.open.popitem(last=False)[1][0].close()
            if self.store.verify:
                self.store.verify_file(shard, self.folder)  # hashed on this Store's first open of the file
            path = store_file(self.store.path, self.folder, f"{shard}.parquet")
            self.open[shard] = (parquet_file(path, verify=self.store.verify), [])
        return self.open[shard]

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1][0].close()


def _slot(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"need 0 <= rank < world_size and 0 <= worker < num_workers, "
                         f"got rank={rank} world_size={world_size} worker={worker} num_workers={num_workers}")
    return rank * num_workers + worker, world_size * num_workers


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    # Seeded by (seed, epoch) only, so that every slot computes the same global order.
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def _columns(columns: Sequence[str] | None, need: Sequence[str] = ()) -> list[str]:
    if columns is None:
        return list(schema.SIGNAL_COLUMNS)
    unknown = [c for c in columns if c not in schema.SIGNAL_COLUMNS]
    if unknown:
        raise ValueError(f"unknown signal columns {unknown}")
    return list(dict.fromkeys([*need, *columns]))
