"""`mcad bench select`: settings chosen on val one factor at a time, each point trained once."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error
from mcad.jobs.bench.select import _winner
from mcad.jobs.cli import main


def _row(value, rsum, status="finished"):
    return {"value": value, "val_rsum": rsum, "status": status}


def test_winner_finished_its_epochs_and_the_incumbent_wins_ties():
    rows = [_row(1.0, 300.0), _row(0.5, 310.0), _row(0.0, 310.0), _row(2.0, None, "error")]
    assert _winner(rows, incumbent=0.0) == (0.0, 310.0)
    assert _winner(rows, incumbent=1.0) == (0.5, 310.0)  # the first of the tied challengers
    # A trial ASHA stopped early reports an earlier epoch's rsum: it never wins, even when higher.
    assert _winner([_row(1.0, 300.0), _row(0.5, 400.0, "stopped early (ASHA)")], incumbent=1.0) == (1.0, 300.0)
    with pytest.raises(Exception, match="finished"):
        _winner([_row(1.0, 250.0, "stopped early (ASHA)")], incumbent=1.0)


def test_a_value_stopped_early_must_be_below_the_incumbent_at_that_epoch():
    """ASHA compared a stopped value only with the other values of its sweep, not with the incumbent."""
    rows = [_row(1.0, 300.0), {**_row(0.5, 250.0, "stopped early (ASHA)"), "epochs": 3}]
    assert _winner(rows, incumbent=1.0, incumbent_at={3: 260.0, 10: 300.0}) == (1.0, 300.0)
    for curve in ({3: 240.0, 10: 300.0}, {10: 300.0}):  # above the incumbent there, or no incumbent figure
        with pytest.raises(Exception, match="undecided"):
            _winner(rows, incumbent=1.0, incumbent_at=curve)


def test_select_refuses_to_resume_on_other_data(tmp_path):
    from mcad.jobs.bench.select import SelectConfig, _pin

    cfg = SelectConfig(store="a", data="d", val_data="v", out=str(tmp_path))
    _pin(cfg, tmp_path)
    _pin(cfg, tmp_path)  # the same: fine
    with pytest.raises(Exception, match="store 'a' -> 'b'"):
        _pin(SelectConfig(store="b", data="d", val_data="v", out=str(tmp_path)), tmp_path)


@pytest.mark.ray
def test_select_runs_each_point_once_and_keeps_the_best_finished(tiny_store, shapes_data, tmp_path):
    out = tmp_path / "select"
    args = ["bench", "select", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--val-data", str(shapes_data / "val"), "--out", str(out), "--factor", "alpha=0,1",
            "--epoch-budgets", "1,2", "--epochs", "1", "--preset", "smoke"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    selection = json.loads((out / "selection.json").read_text())

    # Step 1 ran the default (the incumbent) and both values, in one sweep; read back from its CSV.
    from mcad.student.config import TrainConfig

    rows = list(csv.DictReader(open(out / "1-alpha" / "results.csv")))
    assert sorted(float(r["alpha"]) for r in rows) == sorted({0.0, 1.0, TrainConfig.alpha})
    finished = {float(r["alpha"]): float(r["val_rsum"]) for r in rows if r["status"] == "finished"}
    best = max(finished.values())
    assert selection["chosen"]["alpha"] in [a for a, v in finished.items() if v == best]
    # The epoch step reuses the 1-epoch run of the chosen point and trains only the 2-epoch budget.
    (row,) = list(csv.DictReader(open(out / "2-epochs-2" / "results.csv")))
    assert float(row["alpha"]) == selection["chosen"]["alpha"] and row["epochs"] == "2"
    assert not (out / "2-epochs-1").exists()
    budgets = {1: best, 2: float(row["val_rsum"])}
    assert selection["chosen"]["epochs"] == (2 if budgets[2] > budgets[1] else 1)
    assert "Test is never read" in selection["rule"] and "(incumbent)" in (out / "selection.md").read_text()
    # A second run into the same folder is refused; --resume trains nothing again.
    assert_one_line_error(CliRunner().invoke(main, args), "--resume")
    trials = sorted(p.name for p in out.rglob("trial.json"))
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "selection.json").read_text())["chosen"] == selection["chosen"]
    assert sorted(p.name for p in out.rglob("trial.json")) == trials and "running" not in again.output
