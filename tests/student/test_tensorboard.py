"""`--report-to tensorboard`: the event files read back (TensorBoard's own reader) with the values of metrics.jsonl."""
from __future__ import annotations

import json

import pytest
import torch

from mcad.student.config import TrainConfig
from mcad.student.data import ATTENTION, INPUT_IDS, PIXELS
from mcad.student.models import build_student
from mcad.student.tensorboard import TB_DIR
from mcad.student.train import train

pytest.importorskip("tensorboard")  # an extra that ./dev.sh installs (CI has it)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    return make_tiny_teachers(tmp_path_factory.mktemp("t"), ["a red circle", "a blue square"])[0]


def _batches(processor, n=3, size=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = processor.tokenizer(["a red circle", "a blue square"] * (size // 2), padding=True, return_tensors="pt")
    return [{PIXELS: torch.rand(size, 3, 32, 32, generator=gen), INPUT_IDS: tokens["input_ids"],
             ATTENTION: tokens["attention_mask"]} for _ in range(n)]


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TB_DIR))
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _fake_eval(rsum):
    return {"i2t": {"R@1": rsum / 6, "R@5": rsum / 3}, "t2i": {"R@1": rsum / 5, "R@5": rsum / 4}, "rsum": rsum}


def test_event_files_hold_the_logged_values(tiny_clip_dir, tmp_path):
    student, processor = build_student("smoke", tokenizer_from=tiny_clip_dir, teacher_dim=8, seed=0)
    cfg = TrainConfig(w_dist=0.0, w_feat=0.0, epochs=2, log_every=1)
    per_epoch = [_batches(processor, seed=e) for e in range(cfg.epochs)]
    rsums = iter([100.0, 150.0])
    run = tmp_path / "run"
    train(cfg, student=student, batches=lambda e: iter(per_epoch[e]), steps_per_epoch=3, teacher_logit_scale=10.0,
          run=run, progress=False, validate=lambda s: _fake_eval(next(rsums)), report_to=("tensorboard",),
          hparams={"alpha": 0.5, "preset": "smoke"})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    acc = _events(run)
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "con", "lr", "logit_scale", "samples_per_s"):
        assert f"train/{name}" in tags
        assert _scalars(acc, f"train/{name}") == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in steps]
    assert len(steps) == 6 and all(r["samples_per_s"] > 0 for r in steps)
    assert _scalars(acc, "val/rsum") == [(3, 100.0), (6, 150.0)]
    assert _scalars(acc, "val/i2t_R@1") == [(r["step"], pytest.approx(r["val"]["i2t"]["R@1"])) for r in epochs]
    assert _scalars(acc, "val/t2i_R@5") == [(r["step"], pytest.approx(r["val"]["t2i"]["R@5"])) for r in epochs]
    assert _scalars(acc, "epoch/samples_per_s") == [(r["step"], pytest.approx(r["samples_per_s"], rel=1e-6))
                                                    for r in epochs]
    # The grid point as hparams, in this run (TensorBoard's HPARAMS tab).
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["alpha"].number_value == 0.5 and start.hparams["preset"].string_value == "smoke"


def test_a_resumed_run_drops_the_events_after_its_checkpoint(tiny_clip_dir, tmp_path):
    student, processor = build_student("smoke", tokenizer_from=tiny_clip_dir, teacher_dim=8, seed=0)
    cfg = TrainConfig(w_dist=0.0, w_feat=0.0, epochs=2, log_every=1)
    per_epoch = [_batches(processor, seed=e) for e in range(cfg.epochs)]

    def crashing(epoch):
        for i, batch in enumerate(per_epoch[epoch]):
            if epoch == 1 and i == 2:
                raise KeyboardInterrupt("killed mid-epoch")
            yield batch

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, student=student, batches=crashing, steps_per_epoch=3, teacher_logit_scale=10.0, run=run,
              progress=False, report_to=("tensorboard",))
    student, _ = build_student("smoke", tokenizer_from=tiny_clip_dir, teacher_dim=8, seed=0)
    train(cfg, student=student, batches=lambda e: iter(per_epoch[e]), steps_per_epoch=3, teacher_logit_scale=10.0,
          run=run, progress=False, resume=True, report_to=("tensorboard",))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    # Steps 4 and 5 were logged before the crash and again after the resume: TensorBoard keeps the second.
    assert _scalars(_events(run), "train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
