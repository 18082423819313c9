"""The data shards beside a signal store: what a student reads next to the Parquet files.

A store keeps signals, not images: each student step reads the pass's input
tars again, beside their signals files. This module holds the data side of
that join: each shard's kept samples in order, the check that `--data`
names the very shards (same size and mtime) the store was made from, and
(`--verify-data`) the same samples with each tar's bytes checked against the
sha256 the teacher pass took of it.

    check_data_matches(store, "data/shapes/train")
    pools = iter_joined_pools(store, kept_samples, ...)             # storage/data_join.py
    pools = iter_joined_pools(store, verified_samples(store), ...)
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator

from mcad.pipeline.shard_list import list_shards, shard_name

from mcad.pipeline.shards import Reject, Sample, iter_shard
from mcad.storage.errors import InputError
from mcad.storage.manifest import SOURCE, SOURCE_SHA256, same_source, source_identity


def kept_samples(source: str, *, decode: bool = True) -> Iterator[tuple[str, Sample]]:
    """(key, Sample) of one tar in order; the store's reader skips what the pass rejected.
    decode=False: EncodedSamples, decoded by whoever shows them (student/loader.py)."""
    return ((s.key, s) for s in iter_shard(source, decode=decode) if not isinstance(s, Reject))


def verified_samples(store, *, decode: bool = True) -> Callable[[str], Iterator[tuple[str, Sample]]]:
    """kept_samples that also hash each tar as it streams (the one read the student makes anyway)
    and, when the tar has been read to its end, compare the digest with the one the teacher pass
    recorded: a mismatch raises InputError naming the shard.

    The check comes at the end of each shard, not before its first batch: the digest covers the
    whole file, and knowing it first would take a second read of every tar. A changed tar has
    then fed at most its own shard's batches into the epoch that stops. Refuses at once a store
    whose manifest records no input digests (its pass ran before mcad recorded them).
    """
    entries = {store.manifest.shards[n][SOURCE]: (n, store.manifest.shards[n].get(SOURCE_SHA256))
               for n in store.shards}
    missing = sorted(name for name, want in entries.values() if not want)
    if missing:
        raise InputError(f"--verify-data: the store records no sha256 for shard {missing[0]} ({len(missing)} "
                         f"such: its teacher pass predates input digests); rerun the pass with --overwrite "
                         f"or train without --verify-data")

    def samples(source: str) -> Iterator[tuple[str, Sample]]:
        name, want = entries[source]
        digest = hashlib.sha256()
        for item in iter_shard(source, digest=digest, decode=decode):
            if not isinstance(item, Reject):
                yield item.key, item
        got = digest.hexdigest()
        if got != want:
            raise InputError(f"--verify-data: shard {name} ({source}) has sha256 {got[:16]}..., the teacher "
                             f"pass read {want[:16]}...: the tar changed since the pass (its size and mtime "
                             f"did not); rerun the teacher pass on it")

    return samples


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
