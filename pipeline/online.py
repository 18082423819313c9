"""Online signals: the teachers run in the student's loop (the paper's online setting).

Gives pools the same signal columns the signal store holds, computed on the
spot by `pipeline.signals.compute_pool`, so the student's trainer and its
target maths (student/targets.py) cannot tell the two sources apart. mcad
uses it for the parity test and the speed benchmark: it is what every student
run would cost without the store.
"""
from __future__ import annotations

import torch

from mcad.pipeline.projection import load_projection
from mcad.pipeline.signals import compute_pool
from mcad.pipeline.teachers import load_teachers
from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.storage.manifest import FUSION_PROJ_NAME, store_file


class OnlineSignals:
    """Replace a pool's stored signals with the teachers' own, computed now."""

    def __init__(self, dual, single, projection: torch.Tensor, *, k: int, pair_batch: int = 0):
        self.dual, self.single, self.projection = dual, single, projection
        self.k, self.pair_batch = k, pair_batch

    def __call__(self, pool: dict) -> dict:
        rows = pool[schema.ROW]
        fresh = compute_pool(self.dual, self.single, pool[schema.DATA], k=self.k, projection=self.projection,
                             pair_batch=self.pair_batch, start=int(rows[0]))
        out = dict(pool)
        out.update({name: value for name, value in fresh.items() if name not in (schema.KEY, schema.ROW)})
        return out


def online_signals(store, dual_dir: str, single_dir: str) -> OnlineSignals:
    """The teachers in `dual_dir` and `single_dir` in the loop, checked to be the ones `store` was made with."""
    dual, single = load_teachers(dual_dir, single_dir)
    for role, teacher in (("dual", dual), ("single", single)):
        pinned = store.manifest.teachers.get(role, {})
        now = teacher.identity()
        if any(pinned.get(k) != now[k] for k in ("config_sha256", "weights_sha256")):
            raise InputError(f"online teachers: the {role} teacher {now['path']} is not the one "
                             f"the store was made with ({pinned.get('path')})")
    store.verify_projection()  # W against the manifest's fusion_proj_sha256
    projection = load_projection(store_file(store.path, FUSION_PROJ_NAME))
    return OnlineSignals(dual, single, projection, k=store.dims["k"])
