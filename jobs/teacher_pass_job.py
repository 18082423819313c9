"""`TeacherPassJob`: the teacher pass's configuration, written as JSON beside the store.

Kept apart from jobs/teacher_pass.py, and importing only the stdlib and
storage/errors, so `mcad pipeline teacher-pass --help` can show its defaults
without importing pyarrow or Ray (docs/design.md, section 2: the CLI answers
--help at once).
"""
from __future__ import annotations

from dataclasses import dataclass

from mcad.storage.errors import InputError

MODES = ("fresh", "resume", "overwrite")


@dataclass(frozen=True)
class TeacherPassJob:
    """Everything one teacher pass needs; written as JSON beside the store."""

    data: str
    dual: str
    single: str
    out: str
    pool_size: int = 256
    topk: int = 32
    pair_batch: int = 0             # pairs per single-teacher forward (memory only; results unchanged); 0: the device's
    calibration_rows: int = 2048    # rows the fusion projection W is fitted on
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0     # torch threads per worker; 0: the node's CPUs / workers
    mode: str = "fresh"             # fresh | resume | overwrite
    break_lock: bool = False        # take the store's lock from a pass on another host (storage/lock.py)
    ray_address: str | None = None
    stall_timeout_s: float = 600.0
    # Views (schema v2, docs/design.md section 4): N views per sample (1: the whole image only, a v1
    # store), the first M scored by the single teacher, crops drawn by area share and aspect ratio
    # from a generator keyed by (seed, shard, row, view).
    views: int = 1
    single_views: int = 1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    seed: int = 0
    # How a shard's kept samples form pools (issue #18; storage/schema.POOL_MODES, pipeline/pools.py):
    # consecutive, or neighbours (look-alikes by the dual teacher's image embeddings, rows written pool
    # by pool). A literal here: this module must not import storage/schema (pyarrow) for --help.
    pools: str = "consecutive"

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise InputError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    def pass_config(self):
        from mcad.pipeline.signals import PassConfig

        return PassConfig(pool_size=self.pool_size, topk=self.topk, pair_batch=self.pair_batch,
                          calibration_rows=self.calibration_rows, views=self.view_config(), pools=self.pools)

    def view_config(self):
        from mcad.pipeline.views import ViewConfig

        return ViewConfig(n=self.views, m=self.single_views, crop_scale=tuple(self.crop_scale),
                          crop_ratio=tuple(self.crop_ratio), seed=self.seed)
