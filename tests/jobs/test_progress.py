"""The driver's progress lines for Ray jobs, tailed from the runs' metrics.jsonl (no Ray needed here)."""
from __future__ import annotations

import json

from mcad.jobs.progress import RunProgress, progress_text


def _append(path, *records, end="\n"):
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records[:-1]) + json.dumps(records[-1]) + end)


def test_tailing_folds_complete_lines_and_restarts_on_a_rewritten_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    progress = RunProgress({"trial-a": run, "trial-b": tmp_path / "not-yet"}, steps={"trial-a": 8}, epochs=2)
    progress.poll()
    assert "trial-a" not in capsys.readouterr().err  # no metrics.jsonl yet: no bar
    metrics = run / "metrics.jsonl"
    _append(metrics, {"kind": "step", "step": 1, "epoch": 0, "loss": 3.0, "samples_per_s": 410.2},
            {"kind": "step", "step": 4, "epoch": 0, "loss": 2.0, "samples_per_s": 420.0})
    _append(metrics, {"kind": "epoch", "step": 4, "epoch": 0, "samples_per_s": 400.0, "val_rsum": 123.45}, end="")
    progress.poll()  # the epoch line is not complete yet: only the steps count
    tail = progress.tails["trial-a"]
    assert tail.state == {"step": 4, "epoch": 1, "samples_per_s": 420.0}
    metrics.open("a").write("\n")
    progress.poll()
    assert tail.state["val_rsum"] == 123.45 and tail.bar.n == 4 and tail.bar.total == 8
    tail.bar.refresh()
    assert "trial-a" in capsys.readouterr().err
    metrics.write_text(json.dumps({"kind": "step", "step": 1, "epoch": 0, "samples_per_s": 5.0}) + "\n")
    progress.poll()  # a fresh run in the same folder: its state starts over
    assert tail.state == {"step": 1, "epoch": 1, "samples_per_s": 5.0}
    assert "trial-b" not in progress.tails or progress.tails["trial-b"].bar is None


def test_progress_text_says_epoch_rate_and_last_rsum():
    assert progress_text({"step": 4, "epoch": 1, "samples_per_s": 420.4, "val_rsum": 123.45}, 2) == \
        "epoch 1/2, 420 samples/s, val rsum 123.5"
    assert progress_text({"step": 1}, None) == "epoch 1, val rsum -"
