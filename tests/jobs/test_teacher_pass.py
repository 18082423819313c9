"""The teacher-pass job on a real local Ray cluster: store, resume, determinism, refusals."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass
from mcad.storage.errors import InputError
from mcad.storage.manifest import FUSION_PROJ_NAME, Manifest, POOLS, REJECTED, ROWS, SIGNALS_DIR, signals_path
from mcad.storage.reader import open_store

pytestmark = pytest.mark.ray


@pytest.fixture
def make_job(shapes_data, tiny_teachers, tiny_pass):
    def make(out, **kw) -> TeacherPassJob:
        dual, single = tiny_teachers
        return TeacherPassJob(data=str(shapes_data / "train"), dual=dual, single=single, out=str(out),
                              **tiny_pass, **kw)
    return make


def _tables(store):
    return {p.name: pq.read_table(p) for p in sorted((store / SIGNALS_DIR).glob("*.parquet"))}


@pytest.fixture(scope="module")
def one_worker_store(tiny_store):
    return tiny_store, None


def test_pass_writes_a_complete_store(one_worker_store):
    out, _ = one_worker_store
    store = open_store(out)
    assert store.num_rows == 60
    assert list(store.shards) == ["000000", "000001", "000002"]
    assert store.pool_size == 8 and store.dims["k"] == 3
    assert (out / FUSION_PROJ_NAME).is_file()
    teachers = store.manifest.teachers
    assert teachers["dual"]["weights_sha256"] and teachers["single"]["config_sha256"]
    for name, entry in store.manifest.shards.items():
        assert entry[ROWS] + entry[REJECTED] == 20
        assert entry[POOLS] == 3  # 20 rows in pools of 8: 8, 8, 4


def test_resume_skips_done_shards_and_redoes_the_rest(one_worker_store, make_job, tmp_path):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(one_worker_store[0], out)
    # Simulate a crash after two shards: the third shard's file and entry are gone.
    manifest = Manifest.load(out)
    del manifest.shards["000002"]
    manifest.save(out)
    signals_path(out, "000002").unlink()
    summary = run_teacher_pass(make_job(out, mode="resume"), progress=False)
    assert (summary["shards_run"], summary["shards_skipped"]) == (1, 2)
    before, after = _tables(one_worker_store[0]), _tables(out)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].equals(after[name]), name


def test_resume_refuses_an_input_shard_rewritten_since(one_worker_store, make_job, shapes_data, tmp_path):
    """An input tar changed after the pass (same size, new mtime) is not silently kept as done."""
    import dataclasses
    import os
    import shutil

    out, data = tmp_path / "store", tmp_path / "train"
    shutil.copytree(one_worker_store[0], out)
    shutil.copytree(shapes_data / "train", data)  # copy2: same sizes and mtimes as the pinned ones
    job = dataclasses.replace(make_job(out, mode="resume"), data=str(data))
    assert run_teacher_pass(job, progress=False)["shards_skipped"] == 3
    rewritten = data / "000001.tar"
    stat = rewritten.stat()
    os.utime(rewritten, (stat.st_atime, stat.st_mtime + 5))
    with pytest.raises(InputError, match="000001.tar changed since it was processed"):
        run_teacher_pass(job, progress=False)


def test_two_workers_give_identical_data(one_worker_store, make_job, tmp_path):
    out = tmp_path / "store2"
    run_teacher_pass(make_job(out, workers=2), progress=False)
    before, after = _tables(one_worker_store[0]), _tables(out)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].equals(after[name]), name


def test_existing_store_needs_resume_or_overwrite(one_worker_store, shapes_data, tiny_teachers):
    dual, single = tiny_teachers
    args = ["pipeline", "teacher-pass", "--data", str(shapes_data / "train"), "--dual", dual,
            "--single", single, "--out", str(one_worker_store[0]), "--pool", "8", "--topk", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--resume" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("pool, topk, message", [(8, 9, "must not exceed the pool size"),
                                                 (1, 1, "pool size must be at least 2")])
def test_bad_pool_parameters_exit_2(shapes_data, tiny_teachers, tmp_path, pool, topk, message):
    dual, single = tiny_teachers
    result = CliRunner().invoke(main, [
        "pipeline", "teacher-pass", "--data", str(shapes_data / "train"), "--dual", dual,
        "--single", single, "--out", str(tmp_path / "s"), "--pool", str(pool), "--topk", str(topk)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "s").exists()


def test_teacher_dirs_swapped_exit_2(shapes_data, tiny_teachers, tmp_path):
    dual, single = tiny_teachers
    result = CliRunner().invoke(main, [
        "pipeline", "teacher-pass", "--data", str(shapes_data / "train"), "--dual", single,
        "--single", dual, "--out", str(tmp_path / "s"), "--pool", "8", "--topk", "3"])
    assert result.exit_code == 2
    assert "expected 'clip'" in result.output


# ------------------------------------------------- the next pool prepared while the teachers run (#16)


@pytest.fixture(scope="module")
def shard_with_rejects(shapes_data, tmp_path_factory):
    """The toy shard 000000 with a corrupt image and a sample without caption among its samples."""
    import tarfile

    from helpers import image_bytes, write_tar

    with tarfile.open(shapes_data / "train" / "000000.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    at = len(members) // 2
    members[at:at] = [("bad0.jpg", b"\xff\xd8 not a jpeg"), ("bad0.txt", b"a red circle"),
                      ("bad1.jpg", image_bytes())]
    return write_tar(tmp_path_factory.mktemp("rejects") / "000000.tar", members)


@pytest.mark.parametrize("views", [1, 3])
def test_prefetch_writes_the_serial_pass_bytes(shard_with_rejects, tiny_teachers, tiny_store, tiny_pass, tmp_path,
                                               views):
    """process_shard with the next pool read, decoded and preprocessed ahead (and decode threads)
    writes the very files of the serial pass: signals, rejects and views."""
    from mcad.jobs.teacher_pass_worker import PreparedPixels, process_shard
    from mcad.pipeline.projection import load_projection
    from mcad.pipeline.teachers import load_teachers
    from mcad.storage.manifest import REJECTS_SHA256, SIGNALS_SHA256, VIEWS_SHA256

    dual, single = load_teachers(*tiny_teachers)
    projection = load_projection(tiny_store / FUSION_PROJ_NAME)
    summaries = {}
    for name, kw in (("serial", dict(prefetch=0)), ("ahead", dict(prefetch=1)),
                     ("threads", dict(prefetch=2, decode_threads=2))):
        job = TeacherPassJob(data=str(shard_with_rejects), dual=tiny_teachers[0], single=tiny_teachers[1],
                             out=str(tmp_path / name), **tiny_pass, views=views, single_views=min(2, views))
        summaries[name] = process_shard(dual, single, job, job.pass_config(), projection,
                                        source=str(shard_with_rejects), shard="000000", **kw)
        if name == "serial":
            assert not isinstance(dual.processor, PreparedPixels)  # the serial pass preprocesses in the loop
        else:  # every kept image's pixels, both teachers, came prepared from the read-ahead thread
            assert dual.processor.served == single.processor.served == 20 * (1 if name == "ahead" else 2)
    serial = summaries["serial"]
    assert (serial["rows"], serial["rejected"]) == (20, 2) and serial[SIGNALS_SHA256]
    fields = (SIGNALS_SHA256, REJECTS_SHA256, VIEWS_SHA256, "rows", "rejected", "pools", "source_sha256")
    for name in ("ahead", "threads"):
        assert {f: summaries[name][f] for f in fields} == {f: serial[f] for f in fields}, name
    assert bool(serial[VIEWS_SHA256]) == (views > 1)
    assert isinstance(dual.processor, PreparedPixels) and not dual.processor._ready  # nothing left behind


def test_prepared_pixels_are_the_processors(tiny_teachers):
    import torch

    from helpers import noise_images
    from mcad.jobs.teacher_pass_worker import PreparedPixels
    from mcad.pipeline.teachers import load_teachers

    for teacher in load_teachers(*tiny_teachers):
        images = noise_images([(48, 64), (30, 30), (64, 48)])
        plain = teacher.processor(images=images, return_tensors="pt")["pixel_values"]
        prepared = PreparedPixels(teacher.processor)
        prepared.prepare(images)
        assert torch.equal(prepared(images=images[1:], return_tensors="pt")["pixel_values"], plain[1:])
        assert torch.equal(prepared(images=images[:1], return_tensors="pt")["pixel_values"], plain[:1])
        assert not prepared._ready  # each row handed out once; again: the processor itself
        assert torch.equal(prepared(images=images, return_tensors="pt")["pixel_values"], plain)
        assert prepared.tokenizer is teacher.processor.tokenizer
