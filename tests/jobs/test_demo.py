"""mcad demo end to end at toy size: every stage runs and results.json has the documented shape."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.jobs.demo import DemoConfig, run_demo, train_side_by_side
from mcad.jobs.train_student import StudentJob
from mcad.storage.errors import InputError
from mcad.student.config import TrainConfig

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
    assert {"synth", "teacher_pass", "students", "eval_mcad"} <= on_disk["seconds"].keys()
    assert on_disk["student_seconds"].keys() == {"baseline", "dual_kd", "mcad"}
    # Trained side by side: together they took less than one after the other would have.
    assert on_disk["seconds"]["students"] < sum(on_disk["student_seconds"].values())
    assert (tmp_path / "demo" / "recall.png").stat().st_size > 1000
    assert any("student mcad" in line for line in lines)
    # The three students really differ in their losses.
    configs = {name: json.loads((tmp_path / "demo" / "runs" / name / "train_config.json").read_text())["train"]
               for name in ("baseline", "dual_kd", "mcad")}
    assert configs["baseline"]["w_dist"] == 0 and configs["dual_kd"]["alpha"] == 0 == configs["dual_kd"]["beta"]
    assert configs["mcad"]["alpha"] > 0 and configs["mcad"]["beta"] > 0
    # The students' settings are the student defaults (chosen on val), recorded resolved.
    demo_cfg = json.loads((tmp_path / "demo" / "demo_config.json").read_text())
    for key in ("alpha", "beta"):
        assert configs["mcad"][key] == demo_cfg[key] == getattr(TrainConfig, key)
    assert demo_cfg["epochs"] == 1 and demo_cfg["teacher_beta"] == 1.0  # no teacher_recall.json: 1.0
    # Each test query's rank is kept for the report's paired bootstrap.
    from mcad.jobs.demo import load_ranks

    for method in ("teacher_dual", "teacher_combined", "baseline", "mcad"):
        ranks = load_ranks(tmp_path / "demo", method)
        assert len(ranks["i2t"]) == 10 and len(ranks["t2i"]) == len(ranks["owner"]) == 50
    assert "ranks" not in on_disk["students"]["mcad"]


def test_demo_without_teachers_says_how_to_get_them(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--teachers", str(tmp_path)])
    assert result.exit_code == 2 and "--retrain-teachers" in result.output


def test_shipped_teachers_refuse_a_seed_whose_test_meanings_they_saw(tmp_path):
    """They hold out the val/test meanings of seeds 0-4 only: seed 5's test could hold their training scenes."""
    from helpers import assert_one_line_error
    from mcad.jobs.demo import shipped_teachers
    from mcad.pipeline.shapes import DEMO_TEACHERS_SEEDS

    assert_one_line_error(CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--seed",
                                                    str(DEMO_TEACHERS_SEEDS)]), "seed 5", "--retrain-teachers")
    assert not (tmp_path / "d").exists()
    assert shipped_teachers(DemoConfig(seed=DEMO_TEACHERS_SEEDS - 1))[2] == 0.5  # the beta chosen on val


def test_a_failing_student_is_one_line_and_stops_the_others(tiny_store, shapes_data, tmp_path):
    def job(name, data):
        return StudentJob(store=str(tiny_store), data=str(data), out=str(tmp_path / name), preset="smoke",
                          train=TrainConfig(epochs=50))
    jobs = {"good": job("good", shapes_data / "train"), "bad": job("bad", shapes_data / "val")}
    with pytest.raises(InputError, match=r"^student bad: .*does not match the store") as err:
        train_side_by_side(jobs, echo=lambda _: None)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    # The good student was stopped long before its 50 epochs: no model exported.
    assert not (tmp_path / "good" / "model").exists()


def test_recall_chart_from_stored_results(tmp_path):
    """The demo's chart from a seed of docs/results/report.json (its axis starts near the lowest bar)."""
    from pathlib import Path

    from mcad.jobs.demo import _bar_chart

    block = json.loads((Path(__file__).parents[2] / "docs" / "results" / "report.json").read_text())["per_seed"]["0"]
    _bar_chart({"teachers": block["teachers"], "students": {k: block["students"][k] for k in ("baseline", "dual_kd", "mcad")}},
               tmp_path / "recall.png")
    assert (tmp_path / "recall.png").stat().st_size > 5000
