"""Batches as the reader hands them out: dicts of numpy arrays keyed by schema names.

Conversion from Arrow, and the bounded shuffle buffers of remix mode (`rebatch`)
and of pool-shuffled replay (`pool_buffer`).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

Batch = dict[str, Any]


def to_numpy(table: pa.Table) -> Batch:
    """Arrow table -> batch dict: fixed-size lists as (n, width) arrays, strings as lists."""
    out: Batch = {}
    for name, chunked in zip(table.column_names, table.columns):
        arr = chunked.combine_chunks()
        if pa.types.is_fixed_size_list(arr.type):
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(arr), arr.type.list_size)
        elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            out[name] = arr.to_pylist()
        else:
            out[name] = arr.to_numpy(zero_copy_only=False)
    return out


def rebatch(pools: Iterable[Batch], *, batch_size: int, buffer_size: int,
            rng: np.random.Generator | None) -> Iterator[Batch]:
    """Cut a stream of pool dicts into batches of batch_size rows (the last may be smaller).

    With rng, rows are shuffled through a buffer of about buffer_size rows:
    once it fills, it is permuted and the rows above half of it leave as
    batches, so each row mixes with rows of about buffer_size / P pools.
    """
    if batch_size < 1 or (rng is not None and buffer_size < batch_size):
        raise ValueError(f"need 1 <= batch_size <= buffer_size, got {batch_size}, {buffer_size}")
    parts: list[Batch] = []
    n = 0
    for pool in pools:
        parts.append(pool)
        n += _len(pool)
        if n < (buffer_size if rng is not None else batch_size):
            continue
        buf = _concat(parts)
        if rng is not None:
            buf = _take(buf, rng.permutation(n))
            emit = max(batch_size, (n - buffer_size // 2) // batch_size * batch_size)
        else:
            emit = n // batch_size * batch_size
        for i in range(0, emit, batch_size):
            yield _take(buf, slice(i, i + batch_size))
        parts = [_take(buf, slice(emit, n))] if emit < n else []
        n -= emit
    if n:
        buf = _concat(parts)
        if rng is not None:
            buf = _take(buf, rng.permutation(n))
        for i in range(0, n, batch_size):
            yield _take(buf, slice(i, i + batch_size))


def pool_buffer(pools: Iterable[Batch], size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """Shuffle a stream of pools through a buffer holding at most `size` of them."""
    held: list[Batch] = []
    for pool in pools:
        held.append(pool)
        if len(held) >= size:
            i = int(rng.integers(len(held)))
            held[i], held[-1] = held[-1], held[i]
            yield held.pop()
    for i in rng.permutation(len(held)):
        yield held[i]


def _len(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    out: Batch = {}
    for key, first in parts[0].items():
        if isinstance(first, np.ndarray):
            out[key] = np.concatenate([p[key] for p in parts])
        else:
            out[key] = [x for p in parts for x in p[key]]
    return out


def _take(batch: Batch, idx: np.ndarray | slice) -> Batch:
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) or isinstance(idx, slice):
            out[key] = value[idx]
        else:
            out[key] = [value[i] for i in idx]
    return out
