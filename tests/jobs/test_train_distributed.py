"""Data-parallel students on Ray Train: every pool read by exactly one rank, the same run outputs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.pipeline.store_data import kept_samples
from mcad.storage import schema
from mcad.storage.reader import open_store
from mcad.student.data import student_batches
from mcad.student.config import TrainConfig

pytestmark = pytest.mark.ray


def _pools_read(store, processor, *, epoch: int, rank: int, world_size: int) -> list[tuple[str, int]]:
    seen = []

    def record(pool):  # the signals hook sees every pool a rank reads, before collation
        seen.append((pool[schema.SHARD][0], int(pool[schema.POOL][0])))
        return pool

    for _ in student_batches(store, TrainConfig(), processor, samples=kept_samples, epoch=epoch, signals=record,
                             rank=rank, world_size=world_size):
        pass
    return seen


def test_two_ranks_read_every_pool_exactly_once_per_epoch(tiny_store):
    from mcad.student.models import load_processor

    store = open_store(tiny_store)
    processor = load_processor(store.manifest.teachers["dual"]["path"])
    everything = set(_pools_read(store, processor, epoch=0, rank=0, world_size=1))
    assert len(everything) == store.num_pools
    for epoch in (0, 1):
        a, b = (_pools_read(store, processor, epoch=epoch, rank=r, world_size=2) for r in (0, 1))
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b) and set(a) | set(b) == everything


def test_two_workers_on_ray_train_train_and_export(tiny_store, shapes_data, tmp_path):
    from transformers import CLIPModel

    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "pipeline", "train-student", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
        "--out", str(run), "--preset", "smoke", "--epochs", "2", "--workers", "2",
        "--val-data", str(shapes_data / "val"), "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    # The workers' output is not forwarded; the driver draws rank 0's progress from metrics.jsonl.
    last = result.stderr.replace("\r", "\n").strip().splitlines()
    assert any(line.startswith("train-student") and "12/" in line and "epoch 2/2" in line and "samples/s" in line
               and "val rsum" in line and "val rsum -" not in line for line in last), result.stderr
    store = open_store(tiny_store)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    # Both ranks' samples are counted, each row once: the whole store every epoch.
    assert [r["samples"] for r in epochs] == [store.num_rows, store.num_rows]
    # Shards are dealt whole (2 + 1 of 3 shards of 3 pools): the longer rank sets the step count.
    assert epochs[0]["step"] == 6 and epochs[1]["step"] == 12
    assert all(0 <= r["val_rsum"] <= 600 for r in epochs)
    # Rank 0 wrote the TensorBoard run: the same validation rsum per epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/rsum")] == [
        (r["step"], pytest.approx(r["val_rsum"], rel=1e-6)) for r in epochs]
    assert len(events.Scalars("train/loss")) == sum(1 for line in (run / "metrics.jsonl").read_text().splitlines()
                                                    if json.loads(line)["kind"] == "step")
    assert (run / "checkpoints" / "last").is_dir()
    model = CLIPModel.from_pretrained(run / "model")
    assert json.loads((run / "model" / "mcad_student.json").read_text())["workers"] == 2
    assert not any("head_" in k for k in model.state_dict())


def test_ranks_that_cannot_be_placed_fail_in_one_line(tiny_store, shapes_data, tmp_path, cpus_held):
    from helpers import assert_one_line_error, invoke

    result = invoke("pipeline", "train-student", "--store", tiny_store, "--data", shapes_data / "train",
                    "--out", tmp_path / "run", "--preset", "smoke", "--workers", "2", "--stall-timeout", "3")
    assert_one_line_error(result, "train-student's 2 workers could not be placed within the stall timeout (3 s)",
                          "2 x 1 CPU asked, 0 CPUs free")
