"""Views end to end on a real local Ray cluster (issue #17): the pass with --views, its store checked
and summarised, the boxes the same across workers and resumes, an independent re-embedding with
plain transformers, and students replaying the views (or refusing a recipe they cannot remake).

Two of the toy train split's three shards keep it short: a views pass embeds every view.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import assert_one_line_error, invoke, write_manifest
from mcad.jobs.teacher_pass import run_teacher_pass
from mcad.pipeline.shards import Sample, iter_shard
from mcad.pipeline.store_data import kept_samples
from mcad.pipeline.views import apply_box, crop_sample
from mcad.storage import schema
from mcad.storage.manifest import MANIFEST_NAME, SIGNALS_SHA256, VIEWS_DIR, Manifest, signals_path, views_path
from mcad.storage.reader import open_store
from mcad.student.config import TrainConfig
from mcad.student.data import BLOCK, PIXELS, student_batches

pytestmark = pytest.mark.ray

SHARDS = ("000000", "000001")
VIEWS = dict(views=3, single_views=2, crop_scale=(0.3, 0.9), seed=11)


@pytest.fixture(scope="module")
def make_job(pass_job):
    return lambda out, **kw: pass_job(out, **{**VIEWS, **kw})


@pytest.fixture(scope="module")
def view_store(ray_local, make_job, tmp_path_factory):
    out = tmp_path_factory.mktemp("view_store")
    summary = run_teacher_pass(make_job(out), progress=False)
    assert summary["rows"] == 40
    return out


def _tables(store, folder):
    return {p.name: pq.read_table(p) for p in sorted((store / folder).glob("*.parquet"))}


def test_a_views_pass_writes_a_v2_store_whose_signals_are_the_v1_ones(view_store, tiny_store):
    store = open_store(view_store)
    assert store.manifest.schema_version == 2 and (store.num_views, store.single_views) == (3, 2)
    assert store.views == {**store.views, "n": 3, "m": 2, "crop_scale": [0.3, 0.9], "seed": 11, "rule_version": 1}
    assert pq.read_table(views_path(view_store, "000000")).num_rows == 20 * 2
    # view 0 is the v1 pass: the same signals files, byte for byte (the default --views 1 store is tiny_store)
    v1 = open_store(tiny_store)
    assert v1.manifest.schema_version == 1 and v1.views is None and not (tiny_store / VIEWS_DIR).exists()
    assert "views" not in json.loads((tiny_store / MANIFEST_NAME).read_text())
    for name in SHARDS:
        assert store.manifest.shards[name][SIGNALS_SHA256] == v1.manifest.shards[name][SIGNALS_SHA256]
        assert pq.read_table(signals_path(view_store, name)).equals(pq.read_table(signals_path(tiny_store, name)))


def test_views_are_the_same_with_two_workers_and_after_a_resume(view_store, tmp_path):
    """One pass covers both: the 1-worker store, its shards lost after its calibration, resumed by the
    command the incomplete store names (its view recipe included), with 2 workers, one shard each."""
    import shlex

    from mcad.storage.errors import InputError

    resumed = tmp_path / "resumed"
    shutil.copytree(view_store, resumed)
    manifest = Manifest.load(resumed)
    for name in SHARDS:
        manifest.shards[name]["status"] = "pending"
        signals_path(resumed, name).unlink()
        views_path(resumed, name).unlink()
    manifest.save(resumed)
    with pytest.raises(InputError, match="incomplete: 0 of 2 shards done") as refused:
        open_store(resumed)
    command = shlex.split(str(refused.value).split("finish it with ", 1)[1])
    assert command[-11:] == ["--views", "3", "--single-views", "2", "--crop-scale", "0.3,0.9", "--crop-ratio",
                             f"0.75,{4 / 3!r}", "--seed", "11", "--resume"]
    result = invoke(*command[1:], "--workers", "2")
    assert result.exit_code == 0, result.output
    for folder in ("signals", VIEWS_DIR):
        want, got = _tables(view_store, folder), _tables(resumed, folder)
        assert got.keys() == want.keys() and all(got[n].equals(want[n]) for n in want), folder


def test_a_resume_refuses_another_view_recipe(view_store, make_job, tmp_path):
    from mcad.storage.errors import InputError

    copy = tmp_path / "store"
    shutil.copytree(view_store, copy)
    with pytest.raises(InputError, match="cannot resume .*seed"):
        run_teacher_pass(make_job(copy, mode="resume", seed=12), progress=False)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["views"]["pillow"] = "9.0.0"  # the stored shards were cut by another Pillow
    write_manifest(copy, raw)
    with pytest.raises(InputError, match=r"the view recipe \(pillow\)"):
        run_teacher_pass(make_job(copy, mode="resume"), progress=False)


def test_key_a_reapplied_box_reembedded_with_plain_transformers_matches_the_store(view_store, two_shards, tiny_teachers):
    """Independent of mcad's teachers: the tar decoded, the stored box re-applied, CLIPModel's own forward."""
    from transformers import AutoProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(tiny_teachers[0]).eval()
    processor = AutoProcessor.from_pretrained(tiny_teachers[0])
    table = pq.read_table(views_path(view_store, "000001"))
    rows = table.column(schema.ROW).to_numpy()
    keys = table.column(schema.KEY).to_pylist()
    boxes = np.asarray(table.column(schema.BOX).combine_chunks().flatten()).reshape(-1, 4)
    stored = np.asarray(table.column(schema.IMG_EMB).combine_chunks().flatten()).reshape(len(rows), -1)
    samples = [s for s in iter_shard(two_shards / "000001.tar") if isinstance(s, Sample)]
    images = [apply_box(samples[r].image, box) for r, box in zip(rows, boxes)]
    assert [samples[r].key for r in rows] == keys
    with torch.no_grad():
        out = clip.get_image_features(**processor(images=images, return_tensors="pt"))
    ref = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
    cosine = (torch.nn.functional.normalize(torch.tensor(stored, dtype=torch.float32), dim=-1) * ref).sum(dim=1)
    assert cosine.min() >= 0.999, cosine.min()


def test_validate_checks_the_view_table_and_stats_show_views_and_bytes(view_store, tmp_path):
    result = invoke("signals", "validate", view_store)
    assert result.exit_code == 0, result.output
    assert "3 views per sample" in result.output and "view table" in result.output
    stats = tmp_path / "stats.json"
    result = invoke("signals", "stats", view_store, "--json", stats)
    assert result.exit_code == 0, result.output
    assert "views per sample: 3 (the first 2 scored by the single teacher)" in result.output
    got = json.loads(stats.read_text())
    assert got["views"]["per_sample"] == 3 and got["views"]["single_scored"] == 2
    sizes = got["bytes_per_sample"]
    assert sizes["views"] > 0 and sizes["total"] == pytest.approx(sizes["signals"] + sizes["views"] + sizes["rejects"])
    result = invoke("signals", "sql", view_store, "SELECT count(*) AS n, min(view) AS lo, max(view) AS hi FROM views",
                    "--json")
    assert json.loads(result.output) == {"n": 80, "lo": 1, "hi": 2}
    # a box pushed outside [0, 1] (digests recomputed: the row check must catch it, not the digest)
    copy = tmp_path / "store"
    shutil.copytree(view_store, copy)
    path = views_path(copy, "000000")
    table = pq.read_table(path)
    box = table.column(schema.BOX).to_pylist()
    box[5] = [0.5, 0.5, 1.25, 0.9]
    import pyarrow as pa
    table = table.set_column(table.schema.get_field_index(schema.BOX), schema.BOX, pa.array(box, table.schema.field(schema.BOX).type))
    pq.write_table(table, path)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    for field in ("views_sha256", "views_bytes"):
        raw["shards"]["000000"].pop(field)
    write_manifest(copy, raw)
    assert_one_line_error(invoke("signals", "validate", copy, "--quick"), "shard 000000", "a box lies outside [0, 1]")


def _epoch(store, cfg, epoch):
    from mcad.student.models import load_processor

    processor = load_processor(store.manifest.teachers["dual"]["path"])
    return list(student_batches(store, cfg, processor, samples=kept_samples, epoch=epoch, crop=crop_sample))


def test_students_replay_one_stored_view_per_sample_and_epoch(view_store, tiny_store):
    store = open_store(view_store)
    cycled = [_epoch(store, TrainConfig(views="cycle"), e) for e in (0, 1)]
    for epoch, batches in enumerate(cycled):
        canonical = _epoch(store, TrainConfig(views="canonical"), epoch)
        assert [len(b[BLOCK]) for b in batches] == [len(b[BLOCK]) for b in canonical]  # the same pools
        for a, b in zip(batches, canonical):  # every pool shows crops (cycle: view (epoch + row) mod 3)
            assert not torch.equal(a[PIXELS], b[PIXELS]) and not torch.equal(a["img_emb"], b["img_emb"])
            assert torch.equal(a["txt_emb"], b["txt_emb"]) and torch.equal(a["i2t_idx"], b["i2t_idx"])
    again = _epoch(open_store(view_store), TrainConfig(views="cycle"), 1)  # a resume re-reads the epoch: the same
    for a, b in zip(cycled[1], again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a store without views trains as before, whatever the policy
    v1 = open_store(tiny_store)
    for a, b in zip(_epoch(v1, TrainConfig(views="cycle"), 0), _epoch(v1, TrainConfig(views="canonical"), 0)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_student_replays_views_and_refuses_a_recipe_it_cannot_remake(view_store, two_shards, tmp_path):
    args = ["pipeline", "train-student", "--store", view_store, "--data", two_shards, "--preset", "smoke",
            "--epochs", "1", "--views", "random"]
    result = invoke(*args, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["views"] == "random"
    copy = tmp_path / "store"
    shutil.copytree(view_store, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["views"]["pillow"] = "9.0.0"
    write_manifest(copy, raw)
    args[3] = copy
    assert_one_line_error(invoke(*args, "--out", tmp_path / "r2"), "cut with Pillow 9.0.0", "--views canonical")


def test_bad_view_options_exit_2_in_one_line(two_shards, tiny_teachers, tmp_path):
    base = ["pipeline", "teacher-pass", "--data", two_shards, "--dual", tiny_teachers[0], "--single",
            tiny_teachers[1], "--out", tmp_path / "s"]
    assert_one_line_error(invoke(*base, "--crop-scale", "0.5"), "--crop-scale", "not two numbers LO,HI")
    assert_one_line_error(invoke(*base, "--views", "2", "--single-views", "3"), "single views must be between 1 and")
    assert_one_line_error(invoke(*base, "--crop-ratio", "2,1"), "crop ratio must satisfy")
    assert not (tmp_path / "s").exists()


class _Stop(Exception):
    pass


def test_a_run_resumed_after_its_first_epoch_ends_with_the_uninterrupted_runs_weights(view_store, two_shards,
                                                                                       tmp_path):
    """The views each sample shows depend only on (seed, epoch, shard, row): a resume replays the same."""
    from safetensors.torch import load_file

    from mcad.jobs.train_student import StudentJob, run_train_student

    def job(out, **kw):
        return StudentJob(store=str(view_store), data=str(two_shards), out=str(out), preset="smoke",
                          train=TrainConfig(epochs=2, views="random", seed=3), **kw)

    run_train_student(job(tmp_path / "straight"), progress=False)

    def stop_after_first(record):
        if record["epoch"] == 0:
            raise _Stop  # a crash once epoch 0's checkpoint is written

    with pytest.raises(_Stop):
        run_train_student(job(tmp_path / "resumed"), progress=False, on_epoch=stop_after_first)
    run_train_student(job(tmp_path / "resumed", resume=True), progress=False)
    straight, resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
