"""The teacher pass's actor side: one Ray Data actor turning input shards into signals files.

`ShardWorker` (built by jobs/teacher_pass.py's driver, one per actor) loads
both teachers once in `__init__` (the Ray batch-inference pattern), then runs
`process_shard` for each input row: the shard's signals file, its rejects
(and its views), through plain functions of `pipeline/` and `storage/`. A
shard that cannot be done comes back as a row whose `ERROR` field says why.

Inside each actor the next pool is read, decoded and preprocessed (both teachers'
pixel tensors) in a background thread while the teachers run the current one
(`process_shard(prefetch=1)`; pipeline.read_ahead), images decoded by the
actor's spare cores when it has some (`decode_threads`, at most
MAX_DECODE_THREADS); the store is byte for byte the serial pass's (prefetch=0).
`PreparedPixels` hands each teacher the pixel tensors prepared ahead.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from mcad.jobs.teacher_pass_job import TeacherPassJob
from mcad.storage.errors import InputError, error_line
from mcad.storage.manifest import (
    REJECTS_BYTES, REJECTS_SHA256, SIGNALS_BYTES, SIGNALS_SHA256, SOURCE_SHA256, VIEWS_BYTES, VIEWS_SHA256,
)
from mcad.storage.schema import POOLS_CONSECUTIVE

MAX_DECODE_THREADS = 8
ERROR = "error"  # the per-shard result field saying why a shard could not be done


class ShardWorker:
    """A Ray Data actor: loads the teachers once, then writes one shard per input row."""

    def __init__(self, job: TeacherPassJob, projection_path: str, threads: int, decode_threads: int = 0,
                 prefetch: int = 1):
        import torch

        from mcad.pipeline.projection import load_projection
        from mcad.pipeline.teacher_flops import DEVICE_SHARE
        from mcad.pipeline.teachers import load_teachers

        torch.set_num_threads(threads)
        self.job = job
        self.cfg = job.pass_config()
        # Actors sharing a GPU (--gpus-per-worker 0.5) each size their micro-batches to their share.
        share = DEVICE_SHARE * min(1.0, job.gpus_per_worker or 1.0)
        self.dual, self.single = load_teachers(job.dual, job.single, device_share=share)
        self.projection = load_projection(projection_path)
        self.decode_threads, self.prefetch = decode_threads, prefetch

    def __call__(self, batch: dict) -> dict:
        results = [self._one(str(src), str(name)) for src, name in zip(batch["source"], batch["shard"])]
        return {key: np.array([r[key] for r in results]) for key in results[0]}

    def _one(self, source: str, shard: str) -> dict:
        # An unreadable shard or a failed write (read-only output, full disk)
        # comes back as a row: through Ray it would reach the driver as a
        # multi-line traceback with the original error lost. Bugs still raise.
        try:
            return process_shard(self.dual, self.single, self.job, self.cfg, self.projection,
                                 source=source, shard=shard, prefetch=self.prefetch,
                                 decode_threads=self.decode_threads)
        except (InputError, OSError) as exc:
            return {"shard": shard, "source": source, "rows": 0, "rejected": 0, "pools": 0, "bytes": 0,
                    "seconds": 0.0, SOURCE_SHA256: "", SIGNALS_SHA256: "", SIGNALS_BYTES: 0,
                    REJECTS_SHA256: "", REJECTS_BYTES: 0, VIEWS_SHA256: "", VIEWS_BYTES: 0, ERROR: error_line(exc)}


def process_shard(dual, single, job: TeacherPassJob, cfg, projection, *, source: str, shard: str,
                  prefetch: int = 1, decode_threads: int = 0) -> dict:
    """Teachers over one shard -> signals/<shard>.parquet + rejects (+ views/ with views); returns its
    summary (with the input tar's sha256, hashed as the shard is read: no second read).

    prefetch: pools read, decoded and preprocessed ahead in a background thread while the teachers
    run (0: one after the other, the serial pass; the files are the same bytes either way);
    decode_threads: threads decoding images for that reader (0: the reader decodes).
    """
    import hashlib

    from mcad.pipeline.read_ahead import read_ahead
    from mcad.pipeline.shards import iter_shard
    from mcad.pipeline.signals import shard_signals_and_views
    from mcad.storage.writer import write_shard

    start = time.perf_counter()
    digest = hashlib.sha256()
    items = iter_shard(source, digest=digest, decode_threads=decode_threads)
    # Pixels are prepared ahead only for consecutive pools: neighbour pools are formed once the whole
    # shard is read, so prepared pixels would be held for the whole shard (GBs at BLIP's 384 px).
    prepare = prefetch and cfg.pools == POOLS_CONSECUTIVE
    teachers = [prepared_pixels(t) for t in (dual, single)] if prepare else []
    if prefetch:
        items = read_ahead(items, pool_size=cfg.pool_size, depth=prefetch,
                           prepare=(lambda samples: [t.processor.prepare([s.image for s in samples])
                                                     for t in teachers]) if prepare else None)
    try:
        columns, views, rejects, _ = shard_signals_and_views(dual, single, items, shard=shard, config=cfg,
                                                             projection=projection)
    finally:
        for teacher in teachers:
            teacher.processor.forget()
    info = write_shard(job.out, shard, columns, rejects, d=dual.dim, f=single.dim_fused,
                       k=cfg.topk, pool_size=cfg.pool_size, views=views, n_views=cfg.views.n,
                       single_views=cfg.views.m)
    return {"shard": shard, "source": source, VIEWS_SHA256: "", VIEWS_BYTES: 0, **info,
            "seconds": time.perf_counter() - start, SOURCE_SHA256: digest.hexdigest(), ERROR: ""}


class PreparedPixels:
    """A teacher's processor that hands back pixel tensors prepared ahead for given images.

    `prepare(images)` runs the processor on them (the read-ahead thread does,
    a pool ahead); a later call with prepared images (the same objects) stacks
    their rows instead of preprocessing again, each row handed out once; any
    other call goes to the processor itself. Everything else is the
    processor's. The rows are what the processor gives for the images of the
    call (it preprocesses each image on its own), so the teachers' inputs do
    not change.
    """

    def __init__(self, processor):
        self._processor = processor
        self._ready: dict[int, tuple] = {}  # id(image) -> (image, pixel row): the image keeps its id
        self._lock = threading.Lock()
        self.served = 0  # rows handed out prepared

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def prepare(self, images) -> None:
        if not images:
            return
        pixels = self._processor(images=list(images), return_tensors="pt")["pixel_values"]
        with self._lock:
            self._ready.update({id(image): (image, row) for image, row in zip(images, pixels)})

    def __call__(self, *args, images=None, return_tensors=None, **kwargs):
        import torch

        if not args and not kwargs and images is not None and return_tensors == "pt":
            images = list(images)
            with self._lock:
                ready = [self._ready.get(id(image)) for image in images]
                if images and all(r is not None and r[0] is image for r, image in zip(ready, images)):
                    for image in images:
                        self._ready.pop(id(image), None)
                    self.served += len(images)
                    return {"pixel_values": torch.stack([row for _, row in ready])}
        return self._processor(*args, images=images, return_tensors=return_tensors, **kwargs)

    def forget(self) -> None:
        with self._lock:
            self._ready.clear()


def prepared_pixels(teacher):
    """The teacher, its processor wrapped once in PreparedPixels."""
    if not isinstance(teacher.processor, PreparedPixels):
        teacher.processor = PreparedPixels(teacher.processor)
    return teacher
