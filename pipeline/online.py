"""Online evidence: the teachers run in the student's loop (the paper's online setting).

Gives pools the same evidence columns the signal store holds, computed on the
spot by `pipeline.signals.compute_pool`, so the student's trainer and its
target maths (student/targets.py) cannot tell the two sources apart. mcad
uses it for the parity test and the speed benchmark: it is what every student
run would cost without the store.
"""
from __future__ import annotations

import torch

from mcad.pipeline.signals import compute_pool
from mcad.storage import schema


class OnlineEvidence:
    """Replace a pool's stored evidence with the teachers' own, computed now."""

    def __init__(self, dual, single, projection: torch.Tensor, *, k: int, pair_batch: int = 256):
        self.dual, self.single, self.projection = dual, single, projection
        self.k, self.pair_batch = k, pair_batch

    def __call__(self, pool: dict) -> dict:
        rows = pool[schema.ROW]
        fresh = compute_pool(self.dual, self.single, pool[schema.DATA], k=self.k, projection=self.projection,
                             pair_batch=self.pair_batch, start=int(rows[0]))
        out = dict(pool)
        out.update({name: value for name, value in fresh.items() if name not in (schema.KEY, schema.ROW)})
        return out
