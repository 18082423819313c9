"""Grouping a stream into lists of n consecutive items (Python 3.10 has no itertools.batched)."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of `n` consecutive items, in order; the last holds what is left (never empty).

    Lazy: a list is yielded as soon as its n-th item arrives.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk
