import itertools

import pytest

from mcad.storage.iters import batched


def test_batched_groups_in_order_with_a_short_last_list():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batched([], 3)) == []
    assert list(batched("ab", 1)) == [["a"], ["b"]]


def test_batched_is_lazy():
    """A group comes out as soon as it is full: an endless stream still yields."""
    assert list(itertools.islice(batched(itertools.count(), 2), 2)) == [[0, 1], [2, 3]]


def test_batched_refuses_n_below_one():
    with pytest.raises(ValueError):
        next(batched([1], 0))
