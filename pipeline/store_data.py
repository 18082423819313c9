"""The data shards beside a signal store: what a student reads next to the Parquet files.

A store keeps signals, not images: each student step reads the pass's input
tars again, beside their signals files. This module holds the data side of
that join: each shard's kept samples in order, and the check that `--data`
names the very shards (same size and mtime) the store was made from.

    check_data_matches(store, "data/shapes/train")
    pools = store.iter_joined_pools(kept_samples, ...)
"""
from __future__ import annotations

from typing import Iterator

from mcad.pipeline.shards import Sample, iter_shard, list_shards, shard_name
from mcad.storage.errors import InputError
from mcad.storage.manifest import same_source, source_identity


def kept_samples(source: str) -> Iterator[tuple[str, Sample]]:
    """(key, Sample) of one tar in order; the store's reader skips what the pass rejected."""
    return ((s.key, s) for s in iter_shard(source) if isinstance(s, Sample))


def check_data_matches(store, data: str) -> None:
    """Refuse data shards that are not the ones the store was made from, naming the mismatch."""
    given = {shard_name(p): p for p in list_shards(data)}
    pinned = store.fingerprint()["shards"]
    missing, extra = sorted(set(pinned) - set(given)), sorted(set(given) - set(pinned))
    if missing or extra:
        raise InputError(f"the data does not match the store: shards {missing[:3]} are in the store but "
                         f"not in --data, {extra[:3]} in --data but not in the store")
    for name, path in given.items():
        now = source_identity(path)
        if not same_source(pinned[name], now):
            raise InputError(f"the data does not match the store: shard {name} ({path}) changed "
                             f"since the teacher pass (size or mtime); rerun the teacher pass")
