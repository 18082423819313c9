"""`mcad bench input`'s per-worker input rates (jobs/bench/input.py's module doc): samples/s of one
process on one core for the student's and the pass's input paths, at the models' own sizes and at
the real sizes (CLIP 224 px for the student and the dual teacher, BLIP 384 px)."""
from __future__ import annotations

import time
from pathlib import Path

REAL_STUDENT_SIDE, REAL_BLIP_SIDE = 224, 384


def _resized(image_processor, side: int, *, square: bool = False):
    """The same processor class and settings at another side (CLIP: shortest edge + crop; BLIP: square)."""
    settings = image_processor.to_dict()
    settings.pop("image_processor_type", None)
    if square or "shortest_edge" not in (settings.get("size") or {}):
        settings["size"] = {"height": side, "width": side}
    else:
        settings["size"] = {"shortest_edge": side}
        settings["crop_size"] = {"height": side, "width": side}
    return type(image_processor)(**settings)


def encoded_samples(train: Path, n: int) -> tuple[list, float]:
    """The first n EncodedSamples of the photo shards (tars read, nothing decoded) and the read's seconds."""
    from mcad.pipeline.shard_list import list_shards
    from mcad.pipeline.store_data import kept_samples

    t0, out = time.perf_counter(), []
    for source in list_shards(str(train)):
        out += [s for _, s in kept_samples(source, decode=False)][: n - len(out)]
        if len(out) >= n:
            break
    return out, time.perf_counter() - t0


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def per_worker_rates(samples: list, read_s: float, *, student_processor, dual_processor, single_processor,
                     pool: int) -> dict:
    """samples/s of one process on one core for each path and size (module doc)."""
    from mcad.jobs.train_student import sample_decoder
    from mcad.storage import schema
    from mcad.student.loader import build_batch

    n = len(samples)
    pools = [samples[i:i + pool] for i in range(0, n, pool)]
    sizes = {
        "models": (student_processor, [dual_processor.image_processor, single_processor.image_processor]),
        "real": (_StudentAt(student_processor, REAL_STUDENT_SIDE),
                 [_resized(dual_processor.image_processor, REAL_STUDENT_SIDE),
                  _resized(single_processor.image_processor, REAL_BLIP_SIDE, square=True)]),
    }
    rates: dict = {}
    for size, (student, teachers) in sizes.items():
        for mode in ("draft", "full"):
            decode = sample_decoder(mode, student)
            t0 = time.perf_counter()
            for chunk in pools:
                build_batch([{schema.DATA: chunk, **_no_signals(len(chunk))}], False, processor=student,
                            decode=decode)
            rates[f"student_{size}_{mode}"] = rate(n, read_s + time.perf_counter() - t0)
        t0 = time.perf_counter()
        for chunk in pools:
            images = [s.decoded().image for s in chunk]
            for processor in teachers:
                processor(images, return_tensors="pt")
        rates[f"pass_{size}"] = rate(n, read_s + time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in samples:
        s.decoded()
    rates["read_and_decode_full"] = rate(n, read_s + time.perf_counter() - t0)
    rates["read_only"] = rate(n, read_s)
    return rates


class _StudentAt:
    """A student processor at another image side: its tokenizer, a resized copy of its image processor."""

    def __init__(self, processor, side: int):
        self.tokenizer = processor.tokenizer
        self.image_processor = _resized(processor.image_processor, side)


def _no_signals(n: int) -> dict:
    """Signal columns of zeros, so collate's signal half runs as in training (its cost is in the rate)."""
    import numpy as np

    from mcad.storage import schema

    out = {schema.ROW: np.arange(n), schema.SHARD: ["x"] * n}
    for name in (schema.IMG_EMB, schema.TXT_EMB, schema.FUSED_PROJ):
        out[name] = np.zeros((n, 8), np.float16)
    for d in schema.DIRECTIONS:
        out[schema.col(d, schema.IDX)] = np.tile(np.arange(n, dtype=np.int32)[:, None], (1, 1))
        out[schema.col(d, schema.ITM)] = np.zeros((n, 1), np.float32)
    return out
