"""`--report-to tensorboard` without the tensorboard package: one line saying how to install it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mcad.student.tensorboard import INSTALL_HINT

# The package made unimportable, as on a machine without the extra.
NO_TENSORBOARD = "import sys; sys.modules['tensorboard'] = None; from mcad.jobs.cli import main; main()"


@pytest.mark.parametrize("args", [
    ["pipeline", "train-student", "--store", "s", "--data", "d", "--out", "o"],
    ["pipeline", "sweep", "--store", "s", "--data", "d", "--val-data", "v", "--out", "o", "--grid", "alpha=0,1"],
    ["bench", "report", "--out", "o"],
], ids=["train-student", "sweep", "bench-report"])
def test_without_tensorboard_the_flag_says_how_to_install_it(args, tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_TENSORBOARD, *args, "--report-to", "tensorboard"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"mcad: error: {INSTALL_HINT}"]
    assert not (tmp_path / "o").exists()  # refused before anything was written
