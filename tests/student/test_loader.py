"""student/loader.py: batches built by DataLoader workers are the inline batches, batch by batch.

A store written by storage's own writer (random signals) beside real tars of
photo-like JPEGs (noise, 4:3, larger than the student's side, so draft mode
changes the decode); the tiny CLIP processor; real torch DataLoader workers.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_tar
from mcad.jobs.train_student import DRAFT_MARGIN, StudentJob, auto_loader_workers, sample_decoder
from mcad.pipeline.shards import EncodedSample, iter_shard
from mcad.pipeline.store_data import kept_samples
from mcad.storage.errors import InputError
from mcad.storage.reader import open_store
from mcad.student.config import TrainConfig
from mcad.student.data import student_batches, student_parts
from mcad.student.loader import BatchLoader, Deferred, defer_crop

ROWS = (10, 7, 9)  # three shards, one rejected sample each, pools of 4


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    gradient = np.linspace(0, 160, width, dtype=np.float32)[None, :, None]
    pixels = gradient + rng.normal(0, 25, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def photo_store(tmp_path, make_store):
    """(store path, {shard: tar path}): every tar holds every key of its shard, kept or rejected."""
    from mcad.storage import schema

    path = make_store(tmp_path / "store", shards=len(ROWS), rows_per_shard=ROWS, pool=4)
    store, rng, tars = open_store(path), np.random.default_rng(0), {}
    for name in store.shards:
        kept = [k for pool in store.iter_pools(columns=[schema.KEY]) if pool[schema.KEY][0].startswith(name)
                for k in pool[schema.KEY]]
        members = []
        for j, key in enumerate(kept + sorted(store.rejected_keys(name))):
            members += [(f"{key}.jpg", _jpeg(rng, 256 + 16 * (j % 3), 192)), (f"{key}.txt", f"caption {j}".encode())]
        tars[name] = write_tar(tmp_path / f"{name}.tar", members)
    return path, tars


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers
    from mcad.student.models import load_processor

    dual, _ = make_tiny_teachers(tmp_path_factory.mktemp("t"), ["caption 0 1 2 3 4 5 6 7 8 9 10"])
    return load_processor(dual)


def _samples(tars, *, decode: bool):
    def samples(source: str):
        return kept_samples(str(tars[Path(source).stem]), decode=decode)
    return samples


def _assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _loader(store, tars, cfg, processor, *, epoch, workers, mode="full", rank=0, world_size=1):
    decode = sample_decoder(mode, processor)
    parts = functools.partial(student_parts, store, cfg, samples=_samples(tars, decode=False), epoch=epoch,
                              rank=rank, world_size=world_size)
    loader = BatchLoader(lambda _: parts(), processor=processor, decode=decode, workers=workers, stop=1)
    try:
        return list(loader(0))  # one epoch's batches
    finally:
        loader.close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("cfg", [TrainConfig(pools_per_batch=2, seed=3), TrainConfig(mode="remix", batch_size=5)],
                         ids=["replay", "remix"])
def test_two_workers_give_the_inline_batches_batch_by_batch(photo_store, processor, cfg):
    path, tars = photo_store
    store = open_store(path)
    for epoch in (0, 1):
        classic = list(student_batches(store, cfg, processor, samples=_samples(tars, decode=True), epoch=epoch))
        inline = _loader(store, tars, cfg, processor, epoch=epoch, workers=0)
        workers = _loader(store, tars, cfg, processor, epoch=epoch, workers=2)
        _assert_same(classic, inline)  # full decode: the loader's batches are the classic path's
        _assert_same(inline, workers)
        assert len(inline) == (4 if cfg.mode == "replay" else 6)  # 3 + 2 + 3 pools in 2s; 26 rows in 5s
    # Draft mode: the same batches whatever the number of workers, pixels decoded smaller first.
    draft0 = _loader(store, tars, cfg, processor, epoch=0, workers=0, mode="draft")
    _assert_same(draft0, _loader(store, tars, cfg, processor, epoch=0, workers=3, mode="draft"))
    full = _loader(store, tars, cfg, processor, epoch=0, workers=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, draft0))
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(full, draft0))


def test_persistent_workers_follow_the_epochs_and_stop_when_closed(photo_store, processor):
    import multiprocessing

    path, tars = photo_store
    store, cfg = open_store(path), TrainConfig(mode="remix", batch_size=4, seed=1)
    decode = sample_decoder("draft", processor)

    def parts(epoch):
        return student_parts(store, cfg, samples=_samples(tars, decode=False), epoch=epoch)

    inline = BatchLoader(parts, processor=processor, decode=decode)
    loader = BatchLoader(parts, processor=processor, decode=decode, workers=2)
    first = next(iter(loader(0)))  # an epoch left unfinished: the next one still starts right
    _assert_same([first, first], [next(iter(inline(0)))] * 2)
    children = multiprocessing.active_children()
    assert len(children) >= 2
    for epoch in (1, 2, 1):  # 1 then 2: one stream (the workers run ahead into 2); then back to 1: a restart
        _assert_same(list(inline(epoch)), list(loader(epoch)))
        assert loader._next_epoch == epoch + 1
    assert {c.pid for c in multiprocessing.active_children()} >= {c.pid for c in children}  # the same workers
    loader.close()
    assert not any(c.is_alive() for c in children)


def test_each_rank_gets_its_own_split(photo_store, processor):
    path, tars = photo_store
    store, cfg = open_store(path), TrainConfig()
    for rank in (0, 1):
        classic = list(student_batches(store, cfg, processor, samples=_samples(tars, decode=True), epoch=2,
                                       rank=rank, world_size=2))
        _assert_same(classic, _loader(store, tars, cfg, processor, epoch=2, workers=2, rank=rank, world_size=2))


def test_the_loader_leaves_the_global_torch_rng_alone(photo_store, processor):
    path, tars = photo_store
    store = open_store(path)
    before = torch.random.get_rng_state()
    _loader(store, tars, TrainConfig(), processor, epoch=0, workers=2)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_no_longer_decodes_is_one_line(photo_store, processor, tmp_path, workers):
    path, tars = photo_store
    store = open_store(path)
    broken = dict(tars)
    bad = next(iter(store.iter_pools(columns=["key"])))["key"][2]  # a kept sample of the first shard
    members = []
    for item in iter_shard(tars[store.shards[0]], decode=False):
        data = b"\xff\xd8 garbage" if item.key == bad else item.data
        members += [(f"{item.key}.jpg", data), (f"{item.key}.txt", item.caption.encode())]
    broken[store.shards[0]] = write_tar(tmp_path / "broken.tar", members)
    with pytest.raises(InputError) as err:
        _loader(store, broken, TrainConfig(), processor, epoch=0, workers=workers)
    message = str(err.value)
    assert "\n" not in message and f"sample {bad}: corrupt_image" in message


def test_draft_covers_the_students_side_and_a_views_box(photo_store, processor):
    from mcad.student.models import image_size

    _, tars = photo_store
    side = image_size(processor.image_processor)
    sample = next(s for _, s in kept_samples(str(next(iter(tars.values()))), decode=False))
    assert isinstance(sample, EncodedSample)
    full = sample_decoder("full", processor)(sample, None)
    draft = sample_decoder("draft", processor)(sample, None)
    assert full.image.size == (256, 192) and full.caption == sample.caption
    assert side == 32 and DRAFT_MARGIN == 2
    assert draft.image.size == (128, 96)  # 1/2 covers 2 x 32 in both dimensions, 1/4 (64 x 48) would not
    assert sample_decoder("draft", processor, margin=1)(sample, None).image.size == (64, 48)
    seen = []
    crop = sample_decoder("draft", processor, crop=lambda s, box: seen.append((s.image.size, box)) or s)
    crop(sample, np.array([0.0, 0.0, 0.75, 1.0], np.float32))  # three quarters of the width: 1/2 still covers
    crop(sample, np.array([0.0, 0.0, 0.25, 1.0], np.float32))  # a quarter: 1/2 would give 32 < 64 px of it
    assert [size for size, _ in seen] == [(128, 96), (256, 192)]
    assert defer_crop(sample, "box") == Deferred(sample, "box")


def test_auto_workers_and_refusals(tmp_path):
    job = dict(store="s", data="d", out=str(tmp_path))
    assert StudentJob(**job).loader_workers == -1 and StudentJob(**job).decode == "draft"
    assert auto_loader_workers(StudentJob(**job, loader_workers=3)) == 3
    assert auto_loader_workers(StudentJob(**job, online_teachers=("a", "b"))) == 0
    import os

    cpus = len(os.sched_getaffinity(0))
    assert auto_loader_workers(StudentJob(**job)) == max(0, min(cpus - 1, 8))
    for bad, message in ((dict(loader_workers=-2), "loader_workers must be"), (dict(decode="fast"), "decode must be"),
                         (dict(loader_workers=1, online_teachers=("a", "b")), "--loader-workers 0")):
        with pytest.raises(InputError, match=message):
            StudentJob(**job, **bad)


def test_the_tensor_path_is_close_to_the_processors_pixels(photo_store, processor):
    from mcad.student.loader import tensor_pixels

    _, tars = photo_store
    samples = [s.decoded() for _, s in kept_samples(str(next(iter(tars.values()))), decode=False)][:6]
    pil = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    ours = torch.stack([tensor_pixels(torch.from_numpy(np.array(s.image)).permute(2, 0, 1), processor.image_processor)
                        for s in samples])
    assert ours.shape == pil.shape and ours.dtype == torch.float32
    assert (ours - pil).abs().mean() < 0.02  # normalised units: close, not equal (another resize filter)


def test_gpu_decode_is_refused_in_one_line_where_it_cannot_run(tmp_path):
    from mcad.jobs.train_student import check_gpu_decode

    job = StudentJob(store="s", data="d", out=str(tmp_path), decode="gpu")
    with pytest.raises(InputError, match="--decode gpu decodes on the training's CUDA device"):
        check_gpu_decode(job, "cpu", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torchvision.io.decode_jpeg on the GPU")
def test_gpu_decoded_batches_match_the_cpu_ones_but_for_close_pixels(photo_store, processor):
    path, tars = photo_store
    store, cfg = open_store(path), TrainConfig(pools_per_batch=2)

    def parts(epoch):
        return student_parts(store, cfg, samples=_samples(tars, decode=False), epoch=epoch)

    cpu = list(BatchLoader(parts, processor=processor, decode=sample_decoder("full", processor))(0))
    gpu = list(BatchLoader(parts, processor=processor, decode=None, workers=2, gpu_device=torch.device("cuda"))(0))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        assert a.keys() == b.keys() and b["pixel_values"].device.type == "cuda"
        assert all(torch.equal(a[k], b[k]) for k in a if k != "pixel_values")
        assert (a["pixel_values"] - b["pixel_values"].cpu()).abs().mean() < 0.05
