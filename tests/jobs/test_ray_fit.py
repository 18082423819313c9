"""Requests that fit the nodes (jobs/ray_cluster.py): plain functions of node resource dicts, no cluster."""
from __future__ import annotations

import pytest

from mcad.jobs.ray_cluster import copies_that_fit, refusal, require_fit, share_that_fits
from mcad.storage.errors import InputError

TWO_SMALL = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 1.0, "memory": 1e9}]
MIXED = [{"CPU": 3.0}, {"CPU": 1.0}]
ONE_GPU = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}]


def test_copies_count_per_node_never_across_nodes():
    assert copies_that_fit(TWO_SMALL, {"CPU": 1}) == 2
    assert copies_that_fit(TWO_SMALL, {"CPU": 2}) == 0  # 2 CPUs in the cluster, but on no one node
    assert copies_that_fit(TWO_SMALL, {"CPU": 0.5}) == 4
    assert copies_that_fit([{"CPU": 0.3}], {"CPU": 0.1}) == 3  # fixed-point slack
    assert copies_that_fit(ONE_GPU, {"CPU": 1, "GPU": 0.5}) == 2
    assert copies_that_fit(ONE_GPU, {"CPU": 1, "GPU": 0}) == 16  # a zero amount asks nothing


def test_share_lets_the_copies_fit_at_once():
    assert share_that_fits(TWO_SMALL, "CPU", 2) == 1.0  # one per node, not the cluster's 2 / 2 on one
    assert share_that_fits(TWO_SMALL, "CPU", 1) == 1.0  # not the cluster's total of 2
    assert share_that_fits(MIXED, "CPU", 2) == 1.5  # both on the head; the 1-CPU node cannot hold 2
    assert share_that_fits(MIXED, "CPU", 3) == 1.0
    assert share_that_fits(TWO_SMALL, "CPU", 3) == 0.5
    assert share_that_fits(ONE_GPU, "GPU", 2) == 0.5
    assert share_that_fits(TWO_SMALL, "GPU", 1) == 0.0
    for nodes in (TWO_SMALL, MIXED, ONE_GPU):
        for copies in range(1, 7):
            assert copies_that_fit(nodes, {"CPU": share_that_fits(nodes, "CPU", copies)}) >= copies


@pytest.mark.parametrize("nodes, request_, copies, line", [
    (TWO_SMALL, {"CPU": 2.0}, 1, "each sweep trial asks 2 CPUs; the largest node has 1 (2 nodes)"),
    (TWO_SMALL, {"CPU": 1.0, "GPU": 1.0}, 1, "each sweep trial asks 1 GPU; the largest node has 0 (2 nodes)"),
    ([{"CPU": 1.0}], {"CPU": 0.5, "GPU": 0.5}, 1,
     "each sweep trial asks 0.5 GPUs; the largest node has 0 (1 node)"),
    (ONE_GPU, {"CPU": 1.0, "GPU": 1.0}, 2,
     "2 sweep trials ask 1 CPU, 1 GPU each and must run at once; the nodes hold 1 "
     "(2 nodes, the largest with 8 CPUs, 1 GPU)"),
])
def test_refusal_is_one_line_with_the_request_and_the_largest_node(nodes, request_, copies, line):
    assert refusal(nodes, request_, "sweep trial", copies=copies) == line
    with pytest.raises(InputError, match="^" + line.replace("(", r"\(").replace(")", r"\)") + "$"):
        require_fit(request_, "sweep trial", copies=copies, nodes=nodes)


@pytest.mark.parametrize("nodes, request_, copies", [
    (TWO_SMALL, {"CPU": 1.0}, 2), (TWO_SMALL, {"CPU": 1.0, "GPU": 0.0}, 1), (ONE_GPU, {"CPU": 4, "GPU": 0.5}, 2),
    (MIXED, {"CPU": 3.0}, 1),
])
def test_requests_that_fit_pass(nodes, request_, copies):
    assert refusal(nodes, request_, "x", copies=copies) is None
    assert require_fit(request_, "x", copies=copies, nodes=nodes) is nodes
