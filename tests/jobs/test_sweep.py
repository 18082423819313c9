"""Sweeps on Ray Tune from one store: grid parsing, the sorted table, the best export, resume."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.jobs.sweep import parse_grid, trial_name
from mcad.storage.errors import InputError


def test_parse_grid_types_values_by_setting():
    grid = parse_grid(["alpha=0,0.5", "preset=smoke,s", "k-prime=2,4", "pools_per_batch=1"])
    assert grid == {"alpha": [0.0, 0.5], "preset": ["smoke", "s"], "k_prime": [2, 4], "pools_per_batch": [1]}
    assert trial_name({"preset": "s", "alpha": 0.5}) == "alpha=0.5,preset=s"


def test_parse_grid_takes_the_issue_18_levers_and_string_settings():
    grid = parse_grid(["w_rank=0,1", "itm-temperature=1,4", "itm_norm=none,pool", "rank_by=itm,combined",
                       "views=cycle,random"])
    assert grid == {"w_rank": [0.0, 1.0], "itm_temperature": [1.0, 4.0], "itm_norm": ["none", "pool"],
                    "rank_by": ["itm", "combined"], "views": ["cycle", "random"]}
    assert trial_name({"itm_norm": "pool", "w_rank": 0.5}) == "itm_norm=pool,w_rank=0.5"
    # mcad bench select's --factor reuses the sweep's grid
    from mcad.jobs.bench.select import parse_factors

    assert parse_factors(("w_rank=0,0.5,1", "itm_norm=none,pool")) == (
        ("w_rank", (0.0, 0.5, 1.0)), ("itm_norm", ("none", "pool")))


@pytest.mark.parametrize("spec, message", [
    ("alpha", "expected NAME=V1"), ("gamma=1", "unknown setting"), ("preset=xl", "unknown presets"),
    ("alpha=a,b", "must be floats"), ("epochs=1,2", "same for every trial"),
    ("itm_norm=none,batch", "grid itm_norm=batch: itm_norm must be one of"),
    ("w_rank=1,-1", "grid w_rank=-1.0: w_rank must be >= 0"), ("itm_temperature=0", "itm_temperature must be"),
])
def test_parse_grid_refuses_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        parse_grid([spec])


@pytest.mark.ray
def test_sweep_ranks_trials_exports_the_best_and_resumes(tiny_store, shapes_data, tmp_path):
    from transformers import CLIPModel

    out = tmp_path / "sweep"
    args = ["pipeline", "sweep", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--val-data", str(shapes_data / "val"), "--out", str(out), "--grid", "alpha=0,1",
            "--grid", "preset=smoke", "--epochs", "2", "--parallel", "2", "--report-to", "tensorboard"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # Each trial's progress on the driver (tailed from its metrics.jsonl), without Tune's status boxes ...
    assert "Trial status" not in result.output and "== Status ==" not in result.output, result.output
    lines = result.stderr.replace("\r", "\n").splitlines()
    for trial in ("alpha=0.0,preset=smoke", "alpha=1.0,preset=smoke"):
        assert any(line.startswith(trial) and "samples/s" in line and "val rsum " in line
                   and "val rsum -" not in line for line in lines), result.stderr
        # ... and in TensorBoard: one run per trial, its grid point as hparams.
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "trials" / trial / "tensorboard"))
        events.Reload()
        assert events.Scalars("val/rsum") and "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["trial"] for r in rows) == ["alpha=0.0,preset=smoke", "alpha=1.0,preset=smoke"]
    # ASHA with 2 trials and reduction factor 2 lets at least the best one finish; finished trials come
    # first (a stopped trial's rsum is from an earlier epoch), each group by rsum.
    assert rows[0]["status"] == "finished" and rows[0]["epochs"] == "2"
    for group in ([r for r in rows if r["status"] == "finished"], [r for r in rows if r["status"] != "finished"]):
        rsums = [float(r["val_rsum"]) for r in group]
        assert rsums == sorted(rsums, reverse=True)
    assert [r["status"] == "finished" for r in rows] == sorted((r["status"] == "finished" for r in rows),
                                                               reverse=True)
    best = json.loads((out / "best" / "mcad_sweep.json").read_text())
    assert best["trial"] == rows[0]["trial"]
    CLIPModel.from_pretrained(out / "best")
    # Every trial pinned the same store: no teacher ran again.
    pins = {(out / "trials" / r["trial"] / "store_fingerprint.json").read_text() for r in rows}
    assert len(pins) == 1
    # Interrupted: the other trial has a checkpoint but no recorded outcome. --resume skips
    # the finished trial (its folder untouched) and continues the other from its checkpoint.
    finished = out / "trials" / rows[0]["trial"] / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    other = out / "trials" / rows[1]["trial"]
    (other / "trial.json").unlink()
    epochs_before = [json.loads(line)["epoch"] for line in (other / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["kind"] == "epoch"]
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0, again.output
    assert finished.stat().st_mtime_ns == before
    assert json.loads((other / "trial.json").read_text())["status"] in ("finished", "stopped early (ASHA)")
    epochs_after = [json.loads(line)["epoch"] for line in (other / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "epoch"]
    assert epochs_after[:len(epochs_before)] == epochs_before and len(set(epochs_after)) == len(epochs_after)
    assert {r["trial"] for r in csv.DictReader(open(out / "results.csv"))} == {r["trial"] for r in rows}


@pytest.mark.ray
def test_sweep_refuses_a_non_empty_out_and_a_changed_grid(tiny_store, shapes_data, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "x").write_text("x")
    base = ["pipeline", "sweep", "--store", str(tiny_store), "--data", str(shapes_data / "train"),
            "--val-data", str(shapes_data / "val"), "--out", str(out), "--grid", "alpha=0,1"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2 and "is not empty" in result.output
    result = CliRunner().invoke(main, base + ["--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output


@pytest.mark.ray
def test_a_sweep_whose_trials_cannot_be_placed_fails_in_one_line(tiny_store, shapes_data, tmp_path, cpus_held):
    from helpers import invoke

    out = tmp_path / "sweep"
    result = invoke("pipeline", "sweep", "--store", tiny_store, "--data", shapes_data / "train",
                    "--val-data", shapes_data / "val", "--out", out, "--grid", "alpha=0,1",
                    "--grid", "preset=smoke", "--epochs", "1", "--stall-timeout", "3")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines() == [  # Tune's own table of trials is on stdout
        "mcad: error: sweep stalled: no trial could start within the stall timeout (3 s; each asks 2 CPUs, "
        "other jobs may hold them); 2 of 2 trials not run, rerun with --resume"], result.stderr
    assert not list((out / "trials").glob("*/trial.json"))  # no trial is recorded as done: --resume runs them
