"""`mcad bench select`: settings chosen on val one factor at a time, each from its own sweep's table."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error
from mcad.jobs.bench.select import _winner
from mcad.jobs.cli import main


def test_winner_is_the_best_rsum_and_ties_go_to_the_value_listed_first():
    table = [{"beta": 1.0, "val_rsum": 300.0}, {"beta": 0.5, "val_rsum": 310.0}, {"beta": 0.0, "val_rsum": 310.0},
             {"beta": 2.0, "val_rsum": ""}]  # a trial that reported nothing never wins
    assert _winner(table, "beta", (0.0, 0.5, 1.0, 2.0)) == (0.0, 310.0)
    assert _winner(table, "beta", (2.0, 1.0, 0.5, 0.0)) == (0.5, 310.0)
    with pytest.raises(Exception, match="no trial"):
        _winner([{"beta": 1.0, "val_rsum": ""}], "beta", (1.0,))


@pytest.mark.ray
def test_select_chooses_each_factor_from_its_sweep_and_carries_it_forward(tiny_store, shapes_data, tmp_path):
    out = tmp_path / "select"
    args = ["bench", "select", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--val-data", str(shapes_data / "val"), "--out", str(out), "--factor", "alpha=0,1",
            "--epoch-budgets", "1,2", "--epochs", "1", "--preset", "smoke"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    selection = json.loads((out / "selection.json").read_text())

    def best(folder, column):  # read back from the sweep's own CSV, independently of select.py
        rows = list(csv.DictReader(open(folder / "results.csv")))
        top = max(float(r["val_rsum"]) for r in rows)
        return [r for r in rows if float(r["val_rsum"]) == top][0][column], rows

    alpha, rows = best(out / "1-alpha", "alpha")
    assert float(alpha) == selection["chosen"]["alpha"] and len(rows) == 2
    budgets = {e: best(out / f"2-epochs-{e}", "val_rsum")[0] for e in (1, 2)}
    assert selection["chosen"]["epochs"] == max(budgets, key=lambda e: float(budgets[e]))
    for e in (1, 2):  # step 1's winner is held fixed in the epoch step
        (row,) = list(csv.DictReader(open(out / f"2-epochs-{e}" / "results.csv")))
        assert float(row["alpha"]) == selection["chosen"]["alpha"] and row["epochs"] == str(e)
    assert "Test is never read" in selection["rule"] and "(chosen)" in (out / "selection.md").read_text()
    # A second run into the same folder is refused; --resume reuses every finished sweep.
    assert_one_line_error(CliRunner().invoke(main, args), "--resume")
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "selection.json").read_text())["chosen"] == selection["chosen"]
