"""A signal store joined with its data: each pool with its decoded samples under `schema.DATA`.

A store keeps signals, not images: a student reads each shard's signals file
side by side with the shard's tar, through an iterator the caller hands in
(`open_samples(source)` yields (key, sample) in tar order; storage never
parses tars). On an opened Store (storage/reader.py):

- `iter_joined_pools(store, open_samples, ...)`: the pools, with their samples;
  whole shards are dealt to (rank, worker) slots;
- `iter_joined_rows(store, open_samples, ...)`: batches of rows mixed across
  those pools through a bounded buffer (remix mode).

Samples the teacher pass rejected (listed in rejects/) may be included, they
are skipped; any other mismatch between the data and the store's keys stops
the join with one line naming the shard and the row. With `views=True` (a
store of N > 1 views), each pool also holds its view rows (storage/views.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mcad.storage import schema
from mcad.storage.batches import Batch, pool_buffer, rebatch
from mcad.storage.errors import InputError
from mcad.storage.manifest import SIGNALS_DIR, SOURCE, VIEWS_DIR, signals_path
from mcad.storage.parquet_files import parquet_file, read_checked
from mcad.storage.reader import Store, _columns, _Files, _order, _slot

OpenSamples = Callable[[str], Iterable[tuple[str, Any]]]


def iter_joined_pools(store: Store, open_samples: OpenSamples, *, shuffle: bool = False, seed: int = 0,
                      epoch: int = 0, rank: int = 0, world_size: int = 1, worker: int = 0,
                      num_workers: int = 1, buffer_pools: int = 4,
                      columns: Sequence[str] | None = None, views: bool = False) -> Iterator[Batch]:
    """Yield the store's pools with their samples under schema.DATA, reading each shard beside its tar.

    `open_samples(source)` yields (key, sample) in tar order; samples the
    teacher pass rejected (listed in rejects/) may be included, they are
    skipped. Whole shards are dealt to slots (shuffled by seed+epoch when
    shuffle), and with shuffle a buffer of `buffer_pools` pools mixes them.
    With `views` (and a store of N > 1 views), each pool also holds its view rows.
    """
    slot, slots = _slot(rank, world_size, worker, num_workers)
    cols = _columns(columns, need=(schema.KEY,))
    mine = _order(len(store.shards), shuffle, seed, epoch)[slot::slots]
    views = views and store.num_views > 1
    pools = (p for i in mine for p in _joined_shard(store, open_samples, store.shards[i], cols, views))
    if shuffle and buffer_pools > 1:
        pools = pool_buffer(pools, buffer_pools, np.random.default_rng([seed, epoch, slot]))
    yield from pools


def iter_joined_rows(store: Store, open_samples: OpenSamples, *, batch_size: int, buffer_size: int = 4096,
                     shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0,
                     world_size: int = 1, worker: int = 0, num_workers: int = 1,
                     buffer_pools: int = 4, columns: Sequence[str] | None = None,
                     views: bool = False) -> Iterator[Batch]:
    """Remix on top of iter_joined_pools: batches of rows (with DATA) through a bounded buffer."""
    pools = iter_joined_pools(store, open_samples, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                              world_size=world_size, worker=worker, num_workers=num_workers,
                              buffer_pools=buffer_pools, columns=columns, views=views)
    slot, _ = _slot(rank, world_size, worker, num_workers)
    rng = np.random.default_rng([seed, epoch, slot, 1]) if shuffle else None
    return rebatch(pools, batch_size=batch_size, buffer_size=buffer_size, rng=rng)


def _shard_keys(store: Store, shard: str) -> set[str]:
    """Every kept key of one shard (its signals file's key column, pages checked)."""
    store.verify_file(shard, SIGNALS_DIR)
    with parquet_file(signals_path(store.path, shard)) as pf:
        table = read_checked(pf, list(range(pf.metadata.num_row_groups)), [schema.KEY],
                             store.file_where(shard, SIGNALS_DIR))
    return set(table.column(schema.KEY).to_pylist())


def _joined_shard(store: Store, open_samples: OpenSamples, name: str, cols: list[str],
                  views: bool = False) -> Iterator[Batch]:
    samples = iter(open_samples(store.manifest.shards[name][SOURCE]))
    rejected: set[str] | None = None
    # Neighbour pools: rows are in pool order, the data in input order. A kept sample read before
    # its row waits in `ahead` (up to a shard's samples in memory); `own` holds the kept keys not
    # yet read (a kept key's first occurrence is its sample, a later one a rejected duplicate).
    ahead: dict[str, Any] = {}
    own = _shard_keys(store, name) if store.pool_mode == schema.POOLS_NEIGHBOURS else None
    files = _Files(store, max_open=1)
    view_files = _Files(store, max_open=1, folder=VIEWS_DIR) if views else None
    try:
        for pool_index in range(-(-store.shard_rows[name] // store.pool_size)):
            pool = files.pool(name, pool_index, cols)
            if view_files is not None:
                pool.update(view_files.views(name, pool_index))
            data = []
            for offset, key in enumerate(pool[schema.KEY]):
                row = pool_index * store.pool_size + offset
                if key in ahead:
                    data.append(ahead.pop(key))
                    continue
                while True:
                    got = next(samples, None)
                    if got is None:
                        raise InputError(f"shard {name}, row {row}: the data ended where the store "
                                         f"has key {key!r}")
                    if got[0] == key:
                        break
                    if own is not None and got[0] in own:
                        own.discard(got[0])
                        ahead[got[0]] = got[1]
                        continue
                    rejected = store.rejected_keys(name) if rejected is None else rejected
                    if got[0] not in rejected:
                        raise InputError(f"shard {name}, row {row}: the data has key {got[0]!r} "
                                         f"where the store has key {key!r}")
                if own is not None:
                    own.discard(key)
                data.append(got[1])
            pool[schema.DATA] = data
            yield pool
        for got_key, _ in samples:
            rejected = store.rejected_keys(name) if rejected is None else rejected
            if got_key not in rejected:
                raise InputError(f"shard {name}, row {store.shard_rows[name]}: the data has key "
                                 f"{got_key!r} after the store's last row")
    finally:
        files.close()
        if view_files is not None:
            view_files.close()
        getattr(samples, "close", lambda: None)()
