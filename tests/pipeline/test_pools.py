"""Neighbour pools (issue #18): a deterministic, balanced grouping of look-alikes, against a loop reference."""
from __future__ import annotations

import numpy as np
import pytest

from mcad.pipeline.pools import mean_pool_cosine, neighbour_order


def naive_neighbour_order(emb, pool_size):
    """The rule read literally: lowest unplaced seeds; it takes the most similar unplaced (ties: lower)."""
    x = [list(map(float, row)) for row in emb]
    x = [[a / (sum(b * b for b in row) ** 0.5 or 1.0) for a in row] for row in x]
    left, out = list(range(len(x))), []
    while left:
        seed = left[0]
        rest = sorted(left[1:], key=lambda j: (-sum(a * b for a, b in zip(x[seed], x[j])), j))
        members = sorted([seed] + rest[:pool_size - 1])
        out += members
        left = [j for j in left if j not in members]
    return out


def _clusters(seed, n=40, d=6, k=5):
    """n unit vectors around k centres, shuffled: the grouping must find the centres again."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    label = rng.permutation(np.arange(n) % k)
    x = centres[label] + 0.05 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), label


@pytest.mark.parametrize("n, pool_size", [(40, 8), (37, 8), (5, 8), (9, 1), (12, 12), (0, 4)])
def test_neighbour_order_matches_the_loop_reference_and_is_a_balanced_permutation(n, pool_size):
    x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    order = neighbour_order(x, pool_size)
    assert order.tolist() == naive_neighbour_order(x, pool_size)
    assert sorted(order.tolist()) == list(range(n))
    runs = [order[lo:lo + pool_size] for lo in range(0, n, pool_size)]
    assert [len(r) for r in runs] == [min(pool_size, n - lo) for lo in range(0, n, pool_size)]
    assert all(list(r) == sorted(r) for r in runs)  # shard order inside a pool


def test_neighbour_pools_gather_look_alikes():
    x, label = _clusters(0)
    order = neighbour_order(x, 8)
    assert all(len(set(label[order[lo:lo + 8]])) == 1 for lo in range(0, 40, 8))  # each pool one cluster
    assert mean_pool_cosine(x, order, 8) > 0.99 > 0.5 > mean_pool_cosine(x, np.arange(40), 8)


def test_neighbour_order_is_deterministic_and_breaks_ties_by_position():
    x, _ = _clusters(1)
    assert np.array_equal(neighbour_order(x, 8), neighbour_order(x.copy(), 8))
    # equal vectors tie: the lower positions go first
    same = np.ones((6, 3), dtype=np.float32)
    assert neighbour_order(same, 4).tolist() == [0, 1, 2, 3, 4, 5]
    # a zero vector (no direction) is placed, not lost
    x[3] = 0
    assert sorted(neighbour_order(x, 8).tolist()) == list(range(40))


def test_neighbour_order_refuses_bad_arguments():
    with pytest.raises(ValueError, match="embeddings"):
        neighbour_order(np.zeros(4), 2)
    with pytest.raises(ValueError, match="pool size"):
        neighbour_order(np.zeros((4, 2)), 0)
