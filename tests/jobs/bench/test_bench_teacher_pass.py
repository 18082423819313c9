"""`mcad bench teacher-pass` at smoke size: the JSON shape, ratios are quotients of their figures.

Timings are never asserted (a benchmark, not a test); only what must hold on any machine.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.teacher_pass import TeacherPassBenchConfig, shard_window
from mcad.jobs.cli.bench import teacher_pass_bench
from mcad.storage.manifest import Manifest, SECONDS, signals_path
from mcad.storage.errors import InputError

pytestmark = pytest.mark.ray


def test_bench_teacher_pass_smoke(ray_local, tmp_path):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    result = CliRunner().invoke(teacher_pass_bench, [
        "--size", "smoke", "--samples", "40", "--shards", "4", "--pool", "8", "--topk", "3",
        "--json", str(out), "--dir", str(work)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["bench"] == "teacher-pass"
    assert set(got) >= {"bench", "ratios", "figures", "machine", "config", "covers"}
    assert set(got["ratios"]) == {"ray_over_bare", "two_workers_over_one"}
    fig = got["figures"]
    assert fig["samples"] == 40 and fig["shards"] == 4 and fig["teacher_size"] == "smoke"
    for name in ("bare", "ray_1_worker", "ray_2_workers"):
        assert fig[f"{name}_samples_per_s"] == pytest.approx(40 / fig[f"{name}_seconds"])
    for name in ("ray_1_worker", "ray_2_workers"):
        # The shard phase is part of the whole job, which also calibrates and starts actors.
        assert 0 < fig[f"{name}_seconds"] < fig[f"{name}_end_to_end_seconds"]
    ratios = got["ratios"]
    assert ratios["ray_over_bare"] == pytest.approx(
        fig["ray_1_worker_samples_per_s"] / fig["bare_samples_per_s"])
    assert ratios["two_workers_over_one"] == pytest.approx(
        fig["ray_2_workers_samples_per_s"] / fig["ray_1_worker_samples_per_s"])
    assert {"cpus", "platform", "torch", "ray"} <= set(got["machine"])
    assert "ray_over_bare" in result.stdout and "bare loop" in result.stdout
    assert list(work.iterdir()) == []  # data, teachers and stores are gone


@pytest.mark.parametrize("kw, message", [(dict(samples=3, shards=4), "more than samples"),
                                         (dict(pool_size=4, topk=5), "must not exceed pool_size")])
def test_bad_sizes_refused(kw, message):
    with pytest.raises(InputError, match=message):
        TeacherPassBenchConfig(**kw)


def test_shard_window_spans_first_start_to_last_end(tmp_path, make_store):
    """Two workers: shard 0 runs 0-4 s, shard 1 runs 1-3 s; the window is 4 s, not 4 + 2."""
    import os

    store = make_store(tmp_path / "store", shards=2)
    manifest = Manifest.load(store)
    for name, (end, seconds) in zip(sorted(manifest.shards), [(1000.0, 4.0), (999.0, 2.0)]):
        manifest.shards[name][SECONDS] = seconds
        os.utime(signals_path(store, name), (end, end))
    manifest.save(store)
    assert shard_window(store) == pytest.approx(4.0)
