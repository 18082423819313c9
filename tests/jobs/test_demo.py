"""mcad demo end to end at toy size: every stage runs and results.json has the documented shape."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.demo import DemoConfig, run_demo

pytestmark = pytest.mark.ray

EVAL_KEYS = {"i2t", "t2i", "rsum", "n_images", "n_texts"}


def test_demo_runs_the_whole_flow(ray_local, tiny_teachers, tmp_path):
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    for name, path in zip(("dual", "single"), tiny_teachers):
        (teachers / name).symlink_to(path)
    cfg = DemoConfig(out=str(tmp_path / "demo"), teachers=str(teachers), train=48, val=10, test=10,
                     pool=8, topk=3, epochs=1, preset="smoke")
    lines = []
    results = run_demo(cfg, echo=lines.append)
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["teachers"]) == {"dual", "single", "combined"}
    assert set(on_disk["students"]) == {"baseline", "dual_kd", "mcad"}
    for block in (*on_disk["teachers"].values(), *on_disk["students"].values()):
        assert EVAL_KEYS <= block.keys()
        assert block["n_images"] == 10 and block["n_texts"] == 50  # 5 captions per test image
    assert set(on_disk["paths"]) == {"dual", "single", "store", "baseline", "dual_kd", "mcad"}
    assert {"synth", "teacher_pass", "student_mcad"} <= on_disk["seconds"].keys()
    assert (tmp_path / "demo" / "recall.png").stat().st_size > 1000
    assert any("student mcad" in line for line in lines)
    # The three students really differ in their losses.
    configs = {name: json.loads((tmp_path / "demo" / "runs" / name / "train_config.json").read_text())["train"]
               for name in ("baseline", "dual_kd", "mcad")}
    assert configs["baseline"]["w_dist"] == 0 and configs["dual_kd"]["alpha"] == 0 == configs["dual_kd"]["beta"]
    assert configs["mcad"]["alpha"] > 0 and configs["mcad"]["beta"] > 0


def test_demo_without_teachers_says_how_to_get_them(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--teachers", str(tmp_path)])
    assert result.exit_code == 2 and "--retrain-teachers" in result.output
