"""The teacher pass and a student with data and store given as URIs (file:// here; s3://, gs:// alike)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.storage.reader import open_store

pytestmark = pytest.mark.ray


def test_teacher_pass_and_student_at_uris_match_the_local_store(ray_local, shapes_data, tiny_teachers, tiny_pass,
                                                                tiny_store, tmp_path):
    import pyarrow.parquet as pq

    from mcad.storage.manifest import signals_path

    dual, single = tiny_teachers
    data, store = f"file://{shapes_data / 'train'}", f"file://{tmp_path / 'store'}"
    result = CliRunner().invoke(main, [
        "pipeline", "teacher-pass", "--data", data, "--dual", dual, "--single", single, "--out", store,
        "--pool", str(tiny_pass["pool_size"]), "--topk", str(tiny_pass["topk"]),
        "--pair-batch", str(tiny_pass["pair_batch"]), "--calibration-rows", str(tiny_pass["calibration_rows"])])
    assert result.exit_code == 0, result.output
    remote, local = open_store(store), open_store(tiny_store)
    assert remote.shards == local.shards and remote.num_rows == local.num_rows
    assert all(e["source"].startswith("file://") for e in remote.manifest.shards.values())
    for name in local.shards:  # the same signals as the pass over local paths
        assert pq.read_table(signals_path(tmp_path / "store", name)).equals(
            pq.read_table(signals_path(tiny_store, name)))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "train-student", "--store", store, "--data", data,
                                       "--out", str(run), "--preset", "smoke", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "store_fingerprint.json").read_text())["shards"].keys() == set(local.shards)
    # The same files named by local paths match the store made from their URIs.
    result = CliRunner().invoke(main, ["pipeline", "train-student", "--store", store,
                                       "--data", str(shapes_data / "train"), "--out", str(tmp_path / "r2"),
                                       "--preset", "smoke", "--epochs", "1"])
    assert result.exit_code == 0, result.output
