"""train-student on a real store: outputs, refusals, and stored/online parity."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from mcad.jobs.cli import main
from mcad.pipeline.store_data import kept_samples
from mcad.student.data import student_batches
from mcad.storage.reader import open_store
from mcad.student.config import TrainConfig
from mcad.student.train import batch_loss

pytestmark = pytest.mark.ray


def _args(tiny_store, shapes_data, out, *extra):
    return ["pipeline", "train-student", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--out", str(out), "--preset", "smoke", "--epochs", "1", *extra]


def test_cli_trains_exports_and_records(tiny_store, shapes_data, tmp_path):
    from transformers import CLIPModel

    run = tmp_path / "run"
    result = CliRunner().invoke(main, _args(tiny_store, shapes_data, run, "--val-data", str(shapes_data / "val")))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["val_rsum"] <= 600
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(r["loss"] > 0 and {"con", "dist", "feat"} <= r.keys() for r in steps)
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert json.loads((run / "train_config.json").read_text())["train"]["mode"] == "replay"
    model = CLIPModel.from_pretrained(run / "model")  # plain transformers, heads dropped
    assert not any("head_" in k for k in model.state_dict())


def test_replay_batches_are_whole_pools_once_each(tiny_store, shapes_data):
    from mcad.student.data import BLOCK
    from mcad.student.models import load_processor

    store = open_store(tiny_store)
    processor = load_processor(store.manifest.teachers["dual"]["path"])
    cfg = TrainConfig(pools_per_batch=2)
    batches = list(student_batches(store, cfg, processor, samples=kept_samples, epoch=0))
    assert sum(len(b[BLOCK]) for b in batches) == store.num_rows
    assert len(batches) == 5  # 9 pools (3 shards x [8, 8, 4]) two at a time
    for b in batches:  # every candidate index stays inside its own pool block
        for name in ("i2t_idx", "t2i_idx"):
            idx = b[name]
            real = idx >= 0
            assert (b[BLOCK][idx.clamp(min=0)][real] == b[BLOCK].unsqueeze(1).expand_as(idx)[real]).all()


def test_stored_and_online_signals_give_the_same_losses(tiny_store, shapes_data, tiny_teachers):
    from mcad.pipeline.online import online_signals
    from mcad.student.models import build_student

    store = open_store(tiny_store)
    dual_dir = store.manifest.teachers["dual"]["path"]
    online = online_signals(store, *tiny_teachers)
    scale = store.manifest.params["logit_scale"]
    losses = {}
    for name, signals in (("stored", None), ("online", online)):
        student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=store.dims["d"], seed=3)
        cfg = TrainConfig(alpha=0.7, beta=0.5)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        losses[name] = []
        for batch in list(student_batches(store, cfg, processor, samples=kept_samples, epoch=0, signals=signals))[:3]:
            loss, _ = batch_loss(cfg, student, batch, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["stored"] == pytest.approx(losses["online"], rel=2e-3)


def test_refuses_data_that_is_not_the_stores(tiny_store, shapes_data, tmp_path):
    result = CliRunner().invoke(main, ["pipeline", "train-student", "--store", str(tiny_store),
                                       "--data", str(shapes_data / "val"), "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "does not match the store")


def test_refuses_a_changed_shard(tiny_store, shapes_data, tmp_path):
    import os

    data = tmp_path / "train"
    shutil.copytree(shapes_data / "train", data)  # a moved copy is the same data ...
    os.utime(data / "000001.tar", (1, 1))          # ... but a rewritten shard is not
    result = CliRunner().invoke(main, _args(tiny_store, shapes_data, tmp_path / "r")[:5]
                                + [str(data), "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "changed since the teacher pass")


def test_refuses_other_online_teachers(tiny_store, shapes_data, tmp_path):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    other = make_tiny_teachers(tmp_path / "other", ["a red circle"], seed=1)
    result = CliRunner().invoke(main, _args(tiny_store, shapes_data, tmp_path / "r", "--online-teachers",
                                            *map(str, other)))
    assert_one_line_error(result, "not the one the store was made with")


def test_negative_weight_exits_2(tiny_store, shapes_data, tmp_path):
    result = CliRunner().invoke(main, _args(tiny_store, shapes_data, tmp_path / "r", "--w-dist", "-1"))
    assert_one_line_error(result, "w_dist must be >= 0")


# ------------------------------------------------------ batches built by loader workers (#16)


@pytest.fixture(scope="module")
def views_store(ray_local, shapes_data, tiny_teachers, tiny_pass, tmp_path_factory):
    """A real schema v2 store (three views, two scored by the single teacher) of one toy shard."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    data = tmp_path_factory.mktemp("one_shard")
    (data / "000000.tar").symlink_to(shapes_data / "train" / "000000.tar")
    out = tmp_path_factory.mktemp("views_store")
    run_teacher_pass(TeacherPassJob(data=str(data), dual=tiny_teachers[0], single=tiny_teachers[1], out=str(out),
                                    **tiny_pass, views=3, single_views=2, crop_scale=(0.3, 0.9), seed=5),
                     progress=False)
    return out, data


@pytest.mark.parametrize("policy", ["random", "cycle"])
def test_loader_workers_replay_the_stored_views_as_the_classic_path_does(views_store, policy):
    """Same pools, order and pixels with 0 and 2 loader workers, views cut from the stored boxes."""
    from mcad.jobs.train_student import StudentJob, loader, view_crop
    from mcad.pipeline.views import crop_sample
    from mcad.student.models import load_processor

    path, data = views_store
    store = open_store(path)
    processor = load_processor(store.manifest.teachers["dual"]["path"])
    cfg = TrainConfig(views=policy, mode="remix", batch_size=6, seed=2)
    job = StudentJob(store=str(path), data=str(data), out="unused", train=cfg)
    crop = view_crop(store, cfg)
    assert crop is crop_sample
    for epoch in (0, 1):
        classic = list(student_batches(store, cfg, processor, samples=kept_samples, epoch=epoch, crop=crop))
        for workers in (0, 2):
            got = list(loader(job, store, processor, crop=crop, workers=workers)(epoch))
            assert len(got) == len(classic) == 4  # 20 rows in 6s
            for a, b in zip(classic, got):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_loader_options_and_refusal(tiny_store, shapes_data, tiny_teachers, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, _args(tiny_store, shapes_data, run, "--loader-workers", "2",
                                            "--decode", "full"))
    assert result.exit_code == 0, result.output
    config = json.loads((run / "train_config.json").read_text())
    assert (config["loader_workers"], config["decode"]) == (2, "full")
    exported = json.loads((run / "model" / "mcad_student.json").read_text())
    assert (exported["loader_workers"], exported["decode"]) == (2, "full")
    refused = CliRunner().invoke(main, _args(tiny_store, shapes_data, tmp_path / "r", "--loader-workers", "1",
                                             "--online-teachers", *tiny_teachers))
    assert_one_line_error(refused, "--loader-workers 0")


def test_auto_loader_workers_inside_ray_count_the_cpus_ray_gave(ray_local, tmp_path):
    from mcad.jobs.train_student import StudentJob, auto_loader_workers

    job = StudentJob(store="s", data="d", out=str(tmp_path))

    @ray_local.remote
    def resolved(job):
        return auto_loader_workers(job)

    assert ray_local.get(resolved.options(num_cpus=1).remote(job), timeout=120) == 0  # a Ray Train rank, a trial
    assert ray_local.get(resolved.options(num_cpus=2).remote(job), timeout=120) == 1
