"""`mcad bench student` on the toy store: the JSON shape, ratios are quotients of their figures.

Timings are never asserted (a benchmark, not a test); only what must hold on any machine.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.student import VARIANTS, WHAT_IS_TIMED, StudentBenchConfig
from mcad.jobs.cli.bench import student_bench
from mcad.storage.errors import InputError

pytestmark = pytest.mark.ray


def _store_args(tiny_store, shapes_data, tiny_teachers):
    return ["--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--teachers", *tiny_teachers]


def test_bench_student_on_a_store(tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    import torch

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(student_bench, [*_store_args(tiny_store, shapes_data, tiny_teachers),
                                                "--preset", "smoke", "--steps", "2", "--threads", "1",
                                                "--json", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["bench"] == "student"
    assert set(got) >= {"bench", "ratios", "figures", "machine", "config"}
    assert set(got["ratios"]) == {"mcad_over_plain", "online_over_stored"}
    fig = got["figures"]
    assert {"plain_ms_per_step", "mcad_stored_ms_per_step", "mcad_online_ms_per_step", "batch_size",
            "steps", "what_is_timed"} <= set(fig)
    assert all(fig[f"{v}_ms_per_step"] > 0 for v in VARIANTS)
    assert got["ratios"]["mcad_over_plain"] == pytest.approx(
        fig["mcad_stored_ms_per_step"] / fig["plain_ms_per_step"])
    assert got["ratios"]["online_over_stored"] == pytest.approx(
        fig["mcad_online_ms_per_step"] / fig["mcad_stored_ms_per_step"])
    # Toy store: 3 shards of 20 rows in pools of 8 -> six full pools of 8 (the pools of 4 are left out).
    assert fig["batch_size"] == tiny_pass["pool_size"] and fig["pools"] == 6
    assert fig["steps"] == 2 and fig["what_is_timed"] == WHAT_IS_TIMED
    # Same initialisation, same batch: stored and online signals give the same first loss.
    first = got["checks"]["first_loss"]
    assert first["mcad_online"] == pytest.approx(first["mcad_stored"], rel=2e-3)
    assert first["plain"] != pytest.approx(first["mcad_stored"], rel=1e-3)
    assert {"cpus", "torch_threads", "torch", "load_average_at_start"} <= set(got["machine"])
    assert got["machine"]["torch_threads"] == 1 and torch.get_num_threads() == threads  # restored
    for v in VARIANTS:  # the figure is the median of the timed steps (rounded to the microsecond)
        steps = got["checks"]["step_ms"][v]
        assert len(steps) == 2 and fig[f"{v}_ms_per_step"] == pytest.approx(sum(steps) / 2, abs=1e-2)
    assert "mcad_over_plain" in result.stdout and "teachers online" in result.stdout


def test_bench_uses_the_loops_batches(tiny_store, shapes_data):
    """The timed batch (prebuilt inputs + signals) is exactly what the training loop collates."""
    import torch

    from mcad.jobs.bench.student import encode_pools, load_pools
    from mcad.storage.reader import open_store
    from mcad.student.data import collate, signal_tensors
    from mcad.student.models import load_processor

    store = open_store(tiny_store)
    processor = load_processor(store.manifest.teachers["dual"]["path"])
    pools = load_pools(store)[:2]
    for pool, inputs in zip(pools, encode_pools(pools, processor)):
        ours, loops = {**inputs, **signal_tensors([pool])}, collate([pool], processor=processor)
        assert ours.keys() == loops.keys()
        assert all(torch.equal(ours[k], loops[k]) for k in loops)


@pytest.mark.parametrize("kw, message", [
    (dict(data="data/train"), "go with store"),
    (dict(teachers=("d", "s")), "go with store"),
    (dict(store="store"), "store needs data"),
])
def test_bad_arguments_refused(kw, message):
    from mcad.jobs.bench.student import run_student_bench

    with pytest.raises(InputError, match=message):
        run_student_bench(StudentBenchConfig(), **kw)


@pytest.mark.parametrize("kw, message", [(dict(steps=0), "steps must be"), (dict(pool_size=8, topk=9), "topk")])
def test_bad_config_refused(kw, message):
    with pytest.raises(InputError, match=message):
        StudentBenchConfig(**kw)


def test_other_teachers_refused(tiny_store, shapes_data, tmp_path):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    other = make_tiny_teachers(tmp_path / "other", ["a red circle"], seed=1)
    result = CliRunner().invoke(student_bench, [
        *_store_args(tiny_store, shapes_data, tuple(map(str, other))), "--preset", "smoke", "--steps", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    assert "not the one the store was made with" in str(result.exception)
