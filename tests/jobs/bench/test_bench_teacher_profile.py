"""`mcad bench teacher-pass --profile` at smoke size: the JSON shape and its arithmetic (never timings)."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.teacher_profile import MODEL_STAGES, STAGES, StageClock
from mcad.jobs.cli.bench import teacher_pass_bench


def test_stage_clock_counts_nested_time_once():
    clock = StageClock()
    with clock.stage("signal_maths"):
        time.sleep(0.02)
        with clock.stage("itm_pairs"):
            time.sleep(0.03)
    assert clock.seconds["itm_pairs"] == pytest.approx(0.03, abs=0.02)
    assert clock.seconds["signal_maths"] == pytest.approx(0.02, abs=0.02)
    assert list(clock.wrap_iter("read_decode", [1, 2])) == [1, 2]


def test_profile_smoke(tmp_path):
    out, work = tmp_path / "profile.json", tmp_path / "work"
    work.mkdir()
    result = CliRunner().invoke(teacher_pass_bench, [
        "--profile", "--size", "smoke", "--samples", "12", "--shards", "2", "--pool", "6", "--topk", "2",
        "--json", str(out), "--dir", str(work)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["mode"] == "profile" and set(got["ratios"]) == {"itm_cached_over_uncached",
                                                                "pass_cached_over_uncached"}
    fig = got["figures"]
    assert fig["samples"] == 12 and 1 <= fig["pairs_per_sample"] <= 2 * 2 + 1
    assert set(fig["stage_share"]) == set(STAGES) and sum(fig["stage_share"].values()) == pytest.approx(1)
    assert set(fig["flops_per_sample"]) == set(MODEL_STAGES)
    assert fig["flops_per_sample"]["itm_pairs"] < fig["uncached"]["flops_per_sample"]["itm_pairs"]
    assert 0.95 <= fig["stage_sum_over_total"] <= 1.05
    for run in ("cached", "uncached"):
        assert fig[run]["samples_per_s"] == pytest.approx(12 / fig[run]["total_seconds"])
    assert got["ratios"]["pass_cached_over_uncached"] == pytest.approx(
        fig["cached"]["samples_per_s"] / fig["uncached"]["samples_per_s"])
    assert got["ratios"]["itm_cached_over_uncached"] == pytest.approx(
        fig["cached"]["itm_pairs_per_s"] / fig["uncached"]["itm_pairs_per_s"])
    assert "ITM pairs" in result.output and "itm_cached_over_uncached" in result.output
    assert list(work.iterdir()) == []
