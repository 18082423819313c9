"""Pool membership of a shard's kept samples (docs/design.md, section 3, "Pools"; issue #18).

A pool plays the role of the paper's batch: the teacher pass scores candidates
and the student distils its distributions inside one pool. Two ways to form them
(`mcad pipeline teacher-pass --pools`):

- consecutive (the default): P consecutive kept samples in shard order.
- neighbours: look-alike samples, grouped from the dual teacher's image
  embeddings, so that a pool holds the hard negatives (a swapped colour, a
  swapped place) whose order the single teacher knows and the dual teacher
  does not, and the distribution KL sees them.

`neighbour_order` is pure numpy and deterministic: the same embeddings give
the same pools on any worker and in any resume (the pass computes them from the
shard alone). The store writes the shard's rows in this order, so pool = row // P
holds as before and every reader of pools is unchanged:

    order = neighbour_order(v, pool_size=256)    # v: (n, D) dual image embeddings in shard order
    pools = [order[lo:lo + 256] for lo in range(0, n, 256)]   # shard positions; row r holds order[r]
"""
from __future__ import annotations

import numpy as np


def neighbour_order(emb: np.ndarray, pool_size: int) -> np.ndarray:
    """A permutation of the n shard positions whose runs of `pool_size` hold look-alikes.

    Greedy and balanced: the lowest position not yet placed seeds a pool and takes
    the pool_size - 1 unplaced samples most cosine-similar to it (ties: the lower
    position); the next lowest unplaced position seeds the next pool. Every pool has
    pool_size samples but the last, which has the n mod pool_size left over (as with
    consecutive pools). Within a pool positions keep their shard order. Cosines are
    taken in float64, so the float32 embeddings of one machine give one answer.
    Cost: about (n / pool_size) · n · D multiply-adds.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"need (n, D) embeddings, got shape {x.shape}")
    if pool_size < 1:
        raise ValueError(f"pool size must be positive, got {pool_size}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    left = np.arange(len(x))  # unplaced positions, ascending
    runs = []
    while len(left):
        if len(left) <= pool_size:
            members = left
        else:
            cos = x[left] @ x[left[0]]
            cos[0] = np.inf  # the seed, whatever its rounding
            members = np.sort(left[np.argsort(-cos, kind="stable")[:pool_size]])
        runs.append(members)
        left = np.setdiff1d(left, members, assume_unique=True)
    return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)


def mean_pool_cosine(emb: np.ndarray, order: np.ndarray, pool_size: int) -> float:
    """Mean cosine between distinct members of the same pool, pools read as runs of `order`:
    how alike a grouping's pools are (consecutive pools: order = arange(n))."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    total, pairs = 0.0, 0
    for lo in range(0, len(order), pool_size):
        members = x[order[lo:lo + pool_size]]
        m = len(members)
        if m > 1:
            gram = members @ members.T
            total += float(gram.sum() - np.trace(gram))
            pairs += m * (m - 1)
    return total / pairs if pairs else float("nan")
