"""train-student --resume: a student killed mid-epoch picks up where its checkpoint left it, and a run
pins its store.

- fast checks of the run folder's guard (no Ray, no training);
- a real `mcad pipeline train-student` process killed (SIGKILL) in the middle of an epoch, then
  resumed: the resumed process trains only the epochs and steps after its checkpoint, keeps the
  killed run's log up to it, and ends with the uninterrupted run's weights. Both runs are
  deterministic from the seed, so equal weights alone would not tell a resume from a rerun from
  scratch: what the resumed process itself runs and logs does;
- stores that do not match a run (or its data) are refused in one line.

    ./dev.sh test tests/jobs/test_student_resume.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error, invoke, write_manifest
from mcad.jobs.train_student import FINGERPRINT_NAME, StudentJob, _prepare_run
from mcad.storage.errors import InputError
from mcad.storage.manifest import MANIFEST_NAME, Manifest
from mcad.storage.reader import open_store

ROOT = Path(__file__).resolve().parents[2]
CAPTION = "a small red circle left of a large blue square"


def _job(store, run, **kw) -> StudentJob:
    return StudentJob(store=str(store), data="unused", out=str(run), **kw)


def test_resume_refuses_a_store_that_changed_since_the_run_began(make_store, tmp_path):
    store, run = make_store(tmp_path / "store"), tmp_path / "run"
    _prepare_run(_job(store, run), run, open_store(store))
    assert json.loads((run / FINGERPRINT_NAME).read_text()) == json.loads(json.dumps(open_store(store).fingerprint()))
    _prepare_run(_job(store, run, resume=True), run, open_store(store))  # same store: allowed

    manifest = Manifest.load(store)
    manifest.params["pool_size_note"] = "a pass parameter that was not there"
    manifest.save(store)
    with pytest.raises(InputError, match="store changed since"):
        _prepare_run(_job(store, run, resume=True), run, open_store(store))


def test_resume_needs_a_run_to_resume(make_store, tmp_path):
    store = make_store(tmp_path / "store")
    with pytest.raises(InputError, match="nothing to resume"):
        _prepare_run(_job(store, tmp_path / "empty", resume=True), tmp_path / "empty", open_store(store))


# ------------------------------------------------------------ a student killed mid-epoch

STUDENT_EPOCHS = 4


def student_args(store, data, run, *extra) -> list:
    return ["pipeline", "train-student", "--store", store, "--data", data, "--out", run,
            "--preset", "smoke", "--epochs", STUDENT_EPOCHS, *extra]


@pytest.fixture(scope="module")
def student_run(tiny_store, shapes_data, tmp_path_factory):
    """An uninterrupted student run on the toy store."""
    run = tmp_path_factory.mktemp("student") / "run"
    result = invoke(*student_args(tiny_store, shapes_data / "train", run))
    assert result.exit_code == 0, result.output
    return run


def model_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    (weights,) = sorted((run / "model").glob("*.safetensors"))
    return load_file(weights)


KILLED_STUDENT = r'''
"""A real `mcad` process that SIGKILLs itself as it begins training step KILL_AT (fault tests only)."""
import os, signal, sys

import mcad.student.train as train

KILL_AT = int(sys.argv[1])
real, calls = train.batch_loss, [0]


def batch_loss(*args, **kwargs):
    calls[0] += 1
    if calls[0] == KILL_AT:  # steps 1 .. KILL_AT - 1 are done, this one never will be
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


train.batch_loss = batch_loss  # the loop looks it up at each step
from mcad.jobs.cli import main

main(sys.argv[2:], prog_name="mcad")
'''


def metrics_lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


@pytest.mark.ray  # tiny_store is a real teacher pass
def test_student_killed_mid_epoch_resumes_only_the_rest_from_its_checkpoint(student_run, tiny_store, shapes_data,
                                                                            tmp_path):
    import torch

    steps = open_store(tiny_store).num_pools  # replay, one pool a batch: the steps of an epoch
    kill_at = steps + steps // 2 + 1  # half way through the second epoch
    run = tmp_path / "run"
    args = student_args(tiny_store, shapes_data / "train", run)
    script = tmp_path / "killed_student.py"
    script.write_text(KILLED_STUDENT)
    log = tmp_path / "student.log"
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, str(script), str(kill_at), *map(str, args)], cwd=ROOT,
                            stdout=fh, stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]

    # Killed mid-epoch: the checkpoint holds the first epoch, and the killed process had logged
    # steps of the second one after it (lost work, which the resume must redo and log anew).
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, steps)
    killed = metrics_lines(run)
    records = [json.loads(line) for line in killed]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]
    lost = [r["step"] for r in records if r["kind"] == "step" and r["step"] > steps]
    assert lost and max(lost) < 2 * steps, records
    kept = [line for line, r in zip(killed, records) if r["step"] <= steps]

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    # The resumed process trains the remaining epochs only (it says so, one line per epoch it runs) ...
    ran = re.findall(rf"epoch (\d+)/{STUDENT_EPOCHS}: \d+ samples in ", result.output)
    assert ran == [str(e + 1) for e in range(1, STUDENT_EPOCHS)], result.output
    # ... keeps the killed process's own log lines up to its checkpoint, byte for byte (their
    # timings included: a rerun from scratch would write new ones) ...
    lines = metrics_lines(run)
    assert lines[:len(kept)] == kept
    # ... and logs every later step once, counting on from the checkpoint's step.
    after = [json.loads(line) for line in lines[len(kept):]]
    assert [(r["epoch"], r["step"]) for r in after if r["kind"] == "epoch"] == [
        (e, steps * (e + 1)) for e in range(1, STUDENT_EPOCHS)]
    logged = [r["step"] for r in after if r["kind"] == "step"]
    assert logged == sorted(set(logged)) and min(logged) > steps and logged[0] in lost
    # The weights are those of the uninterrupted run.
    want, got = model_tensors(student_run), model_tensors(run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name].float(), got[name].float(), atol=1e-5), name


# ------------------------------------------------------------ stores that do not match


def _store_with(tiny_store, tmp_path, edit) -> Path:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    raw = json.loads((store / MANIFEST_NAME).read_text())
    edit(raw)
    write_manifest(store, raw)
    return store


def _other_teacher(raw):
    raw["teachers"]["single"]["weights_sha256"] = "0" * 64


def _future_schema(raw):
    raw["schema_version"] = 99


@pytest.mark.ray
@pytest.mark.parametrize("case", ["another shard set", "a changed shard file", "another teacher (online)",
                                  "another teacher (resume)", "unknown schema version"])
def test_student_refuses_a_store_that_does_not_match(case, student_run, tiny_store, shapes_data, tiny_teachers,
                                                    tmp_path):
    train = shapes_data / "train"
    run = tmp_path / "run"
    if case == "another shard set":
        args, needle = student_args(tiny_store, shapes_data / "val", run), "does not match the store"
    elif case == "a changed shard file":
        data = tmp_path / "train"
        shutil.copytree(train, data)
        os.utime(data / "000001.tar", (1, 1))
        args, needle = student_args(tiny_store, data, run), "shard 000001"
    elif case == "another teacher (online)":
        from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

        other = make_tiny_teachers(tmp_path / "other", [CAPTION], seed=1)
        args = student_args(tiny_store, train, run, "--online-teachers", *other)
        needle = "not the one the store was made with"
    elif case == "another teacher (resume)":
        shutil.copytree(student_run, run)
        store = _store_with(tiny_store, tmp_path, _other_teacher)
        args, needle = student_args(store, train, run, "--resume"), "teachers differ"
    else:
        store = _store_with(tiny_store, tmp_path, _future_schema)
        args, needle = student_args(store, train, run), "schema version 99"
    assert_one_line_error(invoke(*args), needle)
