"""`mcad bench sweep` at toy size: both sweeps run every trial, and the ratio is their quotient."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main

pytestmark = pytest.mark.ray


@pytest.mark.slow  # four Tune trials, about a minute: run with -m slow
def test_bench_sweep_times_the_stored_and_online_sweeps(ray_local, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "sweep", "--json", str(out), "--size", "smoke", "--preset", "smoke",
                                       "--samples", "32", "--pool", "16", "--topk", "4", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    f = r["figures"]
    assert r["bench"] == "sweep" and f["trials"] == 2
    for variant in ("stored", "online"):  # the same grid ran to the end both ways
        assert [t["status"] for t in r["checks"][variant]] == ["finished", "finished"]
        assert f[f"{variant}_trials_per_hour"] == pytest.approx(3600 * 2 / f[f"{variant}_sweep_s"])
    assert r["ratios"]["stored_over_online_trials_per_hour"] == pytest.approx(
        f["stored_trials_per_hour"] / f["online_trials_per_hour"])
    assert "stored_over_online_trials_per_hour" in result.output
    assert not any(p.name.startswith("mcad-bench-sweep-") for p in tmp_path.iterdir())  # cleaned up


def test_bench_sweep_refuses_bad_sizes():
    result = CliRunner().invoke(main, ["bench", "sweep", "--trials", "0"])
    assert result.exit_code == 2 and "--trials" in result.output
