"""train-student --resume pins the store: fast checks of the run folder's guard, no Ray, no training."""
from __future__ import annotations

import json

import pytest

from mcad.jobs.train_student import FINGERPRINT_NAME, StudentJob, _prepare_run
from mcad.storage.errors import InputError
from mcad.storage.manifest import Manifest
from mcad.storage.reader import open_store


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
