"""mcad bench report at toy size: every method of every seed, statistics that recompute, restart, speed wiring."""
from __future__ import annotations

import json
import math
import statistics

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.report import METHODS, STUDENTS, ReportConfig, cost, run_report
from mcad.jobs.cli import main
from mcad.storage.errors import InputError

EVAL_KEYS = {"i2t", "t2i", "rsum", "n_images", "n_texts"}
TOY = dict(seeds=2, quick=True, skip_speed=True, train=48, val=10, test=10, pool=8, topk=3, epochs=1,
           preset="smoke")


@pytest.fixture(scope="module")
def toy_report(ray_local, teachers_dir, tmp_path_factory):
    cfg = ReportConfig(out=str(tmp_path_factory.mktemp("report") / "r"), teachers=str(teachers_dir), **TOY)
    lines: list[str] = []
    return cfg, run_report(cfg, echo=lines.append), lines


def _eval_of(report, seed, method):
    block = report["per_seed"][str(seed)]
    if method.startswith("teacher_"):
        return block["teachers"][method.removeprefix("teacher_")]
    return block["students"][method]


@pytest.mark.ray
def test_report_has_every_method_of_every_seed(toy_report):
    cfg, result, lines = toy_report
    from pathlib import Path

    out = Path(cfg.out)
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and result["skipped"] == []
    assert report["methods"] == list(METHODS)
    for seed in (0, 1):
        for method in METHODS:
            block = _eval_of(report, seed, method)
            assert EVAL_KEYS <= block.keys() and block["n_images"] == 10 and block["n_texts"] == 50
    # Two seeds really are two benchmarks (synth from the seed), not one run copied.
    keys = [json.loads((out / f"seed_{s}" / "demo_config.json").read_text())["seed"] for s in (0, 1)]
    assert keys == [0, 1]
    # Each student trained with its own loss settings, from its seed's one store.
    for name, overrides in STUDENTS.items():
        train = json.loads((out / "seed_1" / "runs" / name / "train_config.json").read_text())["train"]
        assert train["seed"] == 1 and train["epochs"] == 1
        for k, v in overrides.items():
            assert train[k] == v
    # Each ablation changes one factor of full MCAD (dual-only KD: alpha and beta; the baseline: both losses).
    mcad = json.loads((out / "seed_0" / "runs" / "mcad" / "train_config.json").read_text())["train"]
    for name, factors in {"alpha0": {"alpha"}, "beta0": {"beta"}, "no_feat": {"w_feat"},
                          "dual_kd": {"alpha", "beta"}, "baseline": {"w_dist", "w_feat"}}.items():
        train = json.loads((out / "seed_0" / "runs" / name / "train_config.json").read_text())["train"]
        assert {k for k in train if train[k] != mcad[k]} == factors, name
    assert report["speed"] is None and report["cost"]["payback_runs"] is None
    assert any(line.startswith("[report seed 1] student mcad: ") for line in lines)


@pytest.mark.ray
def test_report_statistics_recompute_from_the_seeds(toy_report):
    cfg, result, _ = toy_report
    report = json.loads(open(f"{cfg.out}/report.json").read())
    for method in METHODS:
        runs = [_eval_of(report, s, method) for s in (0, 1)]
        got = report["summary"][method]
        for d in ("i2t", "t2i"):
            for k in ("R@1", "R@5", "R@10"):
                values = [r[d][k] for r in runs]
                assert got[d][k]["mean"] == pytest.approx(statistics.fmean(values))
                assert got[d][k]["std"] == pytest.approx(statistics.stdev(values))
        assert got["rsum"]["mean"] == pytest.approx((runs[0]["rsum"] + runs[1]["rsum"]) / 2)
    for method, a in report["ablation_vs_baseline"].items():
        diffs = [_eval_of(report, s, method)["i2t"]["R@1"] - _eval_of(report, s, "baseline")["i2t"]["R@1"]
                 for s in (0, 1)]
        assert a["i2t_R@1"]["mean"] == pytest.approx(statistics.fmean(diffs))
    seconds = [report["per_seed"][str(s)]["seconds"] for s in (0, 1)]
    assert report["cost"]["teacher_pass_s"] == pytest.approx((seconds[0]["teacher_pass"]
                                                              + seconds[1]["teacher_pass"]) / 2)
    n = len(STUDENTS)  # trained side by side: the stage's wall time is shared by all of them
    assert report["cost"]["student_s"] == pytest.approx((seconds[0]["students"] + seconds[1]["students"]) / 2 / n)
    own = [report["per_seed"][str(s)]["student_seconds"]["mcad"] for s in (0, 1)]
    assert report["cost"]["student_s_by_method"]["mcad"]["mean"] == pytest.approx(sum(own) / 2)


@pytest.mark.ray
def test_report_bootstrap_recomputes_from_each_seeds_test_ranks(toy_report):
    """Per seed, each student minus baseline, minus dual-only KD and (the ablations) minus full MCAD over
    the test queries (paired)."""
    import numpy as np

    from mcad.jobs.demo import load_ranks
    from mcad.student.metrics import paired_bootstrap

    cfg, report, _ = toy_report
    from pathlib import Path

    assert sorted(report["bootstrap"]) == ["0", "1"]
    for seed in (0, 1):
        folder = Path(cfg.out) / f"seed_{seed}"
        for method in STUDENTS:  # the kept ranks are the ranks the recall table was computed from
            ranks, ev = load_ranks(folder, method), _eval_of(report, seed, method)
            assert 100 * np.mean(ranks["i2t"] < 1) == pytest.approx(ev["i2t"]["R@1"], abs=0.01)
            assert 100 * np.mean(ranks["t2i"] < 5) == pytest.approx(ev["t2i"]["R@5"], abs=0.01)
        shown = {"baseline": set(STUDENTS) - {"baseline"}, "dual_kd": set(STUDENTS) - {"baseline", "dual_kd"},
                 "mcad": {"alpha0", "beta0", "no_feat"},  # each pair once: not again the other way round
                 "teacher_dual": {"mcad"}, "teacher_single": {"mcad"}, "teacher_combined": {"mcad"}}
        assert {ref: set(block) for ref, block in report["bootstrap"][str(seed)].items()} == shown
        assert {ref: set(block) for ref, block in report["paired_differences"].items()} == shown
        for ref in ("baseline", "dual_kd"):
            block = report["bootstrap"][str(seed)][ref]
            again = paired_bootstrap(load_ranks(folder, "mcad"), load_ranks(folder, ref), n_boot=2000, seed=seed)
            assert block["mcad"] == json.loads(json.dumps(again))
            diff = _eval_of(report, seed, "mcad")["i2t"]["R@1"] - _eval_of(report, seed, ref)["i2t"]["R@1"]
            assert block["mcad"]["i2t"]["diff"] == pytest.approx(diff, abs=0.01)


@pytest.mark.ray
def test_report_markdown_and_plots(toy_report):
    cfg, report, _ = toy_report
    from pathlib import Path

    out = Path(cfg.out)
    md = (out / "report.md").read_text()
    mcad = report["summary"]["mcad"]["i2t"]["R@1"]
    assert f"| student: full MCAD | {mcad['mean']:.1f} ± {mcad['std']:.1f} |" in md
    for method in METHODS:
        assert f"| {report['labels'][method]} |" in md
    per_seed = [report["per_seed"][str(s)]["students"]["mcad"] for s in (0, 1)]
    assert "| mcad | " + " | ".join(f"{r['i2t']['R@1']:.1f} / {r['t2i']['R@1']:.1f}" for r in per_seed) + " |" in md
    assert "## Ablations" in md and "break-even" in md and "n * (r - 1) * S >= T" in md
    assert f"{report['machine']['cpus']} CPUs" in md
    assert f"distillation temperature {report['mcad_train']['kd_temperature']}" in md
    assert (out / "recall.png").stat().st_size > 5000 and (out / "paired.png").stat().st_size > 5000
    assert "## Paired differences, 95 % interval over seeds" in md
    d = report["paired_differences"]["baseline"]["mcad"]["rsum"]
    assert f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" in md
    # Where an interval covers 0 the report says so in words.
    b = report["bootstrap"]["1"]["dual_kd"]["mcad"]["mean"]
    cell = f"{b['diff']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}]"
    assert (cell + " not significant" in md) == (not b["significant"]) and cell in md
    for method in STUDENTS:
        assert (out / f"curves_{method}.png").stat().st_size > 5000
    assert json.loads((out / "report_config.json").read_text())["seeds"] == 2


@pytest.mark.ray
def test_report_restart_keeps_finished_seeds_and_wires_speed(toy_report, monkeypatch):
    """A second run trains nothing again; with speed on, the bench results are copied, not recomputed."""
    import dataclasses

    from mcad.jobs.bench import report

    cfg, first, _ = toy_report
    from pathlib import Path

    model = Path(cfg.out) / "seed_1" / "runs" / "mcad" / "model" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    fake = {
        "student": {"bench": "student", "ratios": {"mcad_over_plain": 1.05, "online_over_stored": 11.0},
                    "figures": {"plain_ms_per_step": 10.0, "mcad_stored_ms_per_step": 10.5,
                                "mcad_online_ms_per_step": 115.5, "batch_size": 8}, "machine": {}},
        "teacher-pass": {"bench": "teacher-pass", "ratios": {"ray_over_bare": 0.9, "two_workers_over_one": 1.4},
                         "figures": {}, "machine": {}},
        "store": {"bench": "store", "ratios": {"bytes_over_raw_payload": 0.87},
                  "figures": {"bytes_per_sample": 2451.0, "reader_rows_per_s": 60000.0}, "machine": {}},
    }
    calls = []

    def bench(name):
        def run(bench_cfg):
            calls.append(name)
            return fake[name]
        return run

    def presets(bench_cfg):
        from mcad.jobs.bench.presets import run_presets_bench

        calls.append("presets")
        return run_presets_bench(bench_cfg)

    from mcad.jobs.bench.presets import PresetsBenchConfig

    monkeypatch.setattr(report, "speed_benches", lambda c: {
        **{n: (bench(n), None, f"mcad bench {n}") for n in fake},
        "presets": (presets, PresetsBenchConfig(teachers=c.teachers, presets=("smoke",), batch=8, batches=1,
                                                warmup=0, gallery=100, queries=2), "mcad bench presets")})
    again = run_report(ReportConfig(**{**dataclasses.asdict(cfg), "skip_speed": False}), echo=lambda _: None)
    assert again["skipped"] == [0, 1] and model.stat().st_mtime_ns == mtime
    assert again["summary"] == json.loads(json.dumps(first["summary"]))
    assert calls == ["student", "teacher-pass", "store", "presets"]
    on_disk = json.loads((Path(cfg.out) / "speed" / "bench-student.json").read_text())
    assert again["speed"]["student"]["ratios"] == on_disk["ratios"] == fake["student"]["ratios"]
    c = again["cost"]
    assert c["online_student_s"] == pytest.approx(11.0 * c["student_s"])
    assert c["break_even_runs"] == pytest.approx(c["teacher_pass_s"] / (10.0 * c["student_s"]))
    assert c["payback_runs"] == math.ceil(c["break_even_runs"])
    md = (Path(cfg.out) / "report.md").read_text()
    assert "| student | `online_over_stored` | 11.000 |" in md and "student smoke" in md
    assert "Kept from an earlier run" not in md
    # A third run reuses the benches it kept, and the report says so.
    calls.clear()
    third = run_report(ReportConfig(**{**dataclasses.asdict(cfg), "skip_speed": False}), echo=lambda _: None)
    assert calls == [] and all(b["kept"] for b in third["speed"].values())
    md = (Path(cfg.out) / "report.md").read_text()
    assert "Kept from an earlier run of the report (found in `speed/`, not measured again): student" in md


@pytest.mark.ray
def test_report_refuses_a_folder_made_with_other_settings(toy_report):
    cfg, _, _ = toy_report
    with pytest.raises(InputError, match="epochs: 1 -> 2"):
        run_report(ReportConfig(**{**TOY, "epochs": 2, "out": cfg.out, "teachers": cfg.teachers}))


def test_cost_payback_formula():
    per_seed = {s: {"seconds": {"teacher_pass": t, "eval_teachers": 1.0, "students": 10.0 * len(STUDENTS)},
                    "student_seconds": {m: 25.0 for m in STUDENTS}} for s, t in ((0, 100.0), (1, 140.0))}
    c = cost(per_seed, 4.0)  # online run 40 s, 30 s more than stored: 120 / 30 = 4 runs
    assert c["teacher_pass_s"] == 120.0 and c["student_s"] == 10.0
    assert c["break_even_runs"] == pytest.approx(4.0) and c["payback_runs"] == 4
    assert cost(per_seed, 0.9)["payback_runs"] is None
    assert cost(per_seed, None)["payback_note"].startswith("speed benches skipped")


def test_report_cli_rejects_bad_input(tmp_path):
    result = CliRunner().invoke(main, ["bench", "report", "--out", str(tmp_path / "r"), "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = CliRunner().invoke(main, ["bench", "report", "--out", str(tmp_path / "r"), "--preset", "xl"])
    assert result.exit_code == 2 and "unknown student size" in result.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(main, ["bench", "report", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output


def test_paired_interval_is_mean_plus_minus_t_sd_over_root_n():
    from mcad.jobs.bench.report_stats import paired_interval, t975

    assert t975(1) == 12.7062 and t975(2) == 4.3027
    assert t975(40) == pytest.approx(2.0211, abs=1e-4) and t975(1000) == pytest.approx(1.9623, abs=1e-4)
    c = paired_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half width 4.3027 / sqrt(3)
    assert c["mean"] == 2.0 and c["high"] - 2.0 == pytest.approx(4.3027 / math.sqrt(3))
    assert c["low"] < 0 < c["high"] and c["significant"] is False
    assert paired_interval([2.0, 2.5, 3.0])["significant"] is True
    assert paired_interval([4.0]) == {"mean": 4.0, "n": 1, "low": None, "high": None, "significant": None}


def test_paired_chart_and_table_from_a_report_written_before_them(tmp_path):
    """A report written before paired differences and bootstrap intervals existed: the differences are
    computed from its per_seed (docs/results/report.json with both keys taken out)."""
    from pathlib import Path

    from mcad.jobs.bench.report_render import paired_markdown, paired_plot

    report = json.loads((Path(__file__).parents[3] / "docs" / "results" / "report.json").read_text())
    report.pop("paired_differences", None)
    report.pop("bootstrap", None)
    md = "\n".join(paired_markdown(report))
    assert md.count("| student: full MCAD |") == 5  # against the baseline, dual-only KD and each of the 3 teachers
    assert "Against student: full MCAD:" in md  # each ablation minus full MCAD
    assert "Against teacher dual (CLIP):" in md  # full MCAD minus each teacher of its seed
    import statistics

    from mcad.jobs.bench.report_stats import paired_differences

    per_seed = report["per_seed"]
    diffs = [(e["students"]["mcad"]["i2t"]["R@1"] + e["students"]["mcad"]["t2i"]["R@1"]
              - e["teachers"]["dual"]["i2t"]["R@1"] - e["teachers"]["dual"]["t2i"]["R@1"]) / 2
             for e in per_seed.values()]
    c = paired_differences(per_seed)["teacher_dual"]["mcad"]["mean_R@1"]
    assert c["n"] == len(per_seed) and c["mean"] == pytest.approx(statistics.fmean(diffs))
    paired_plot(report, tmp_path / "paired.png")
    assert (tmp_path / "paired.png").stat().st_size > 5000


def test_report_refuses_seeds_the_shipped_teachers_did_not_hold_out(tmp_path):
    with pytest.raises(InputError, match="seed 5: the shipped demo teachers hold out"):
        run_report(ReportConfig(out=str(tmp_path / "r"), seeds=6, skip_speed=True))
    assert not (tmp_path / "r").exists()


def test_report_names_the_shipped_teachers_also_from_another_checkout():
    from pathlib import Path

    from mcad.jobs.bench.report_render import markdown

    report = json.loads((Path(__file__).parents[3] / "docs" / "results" / "report.json").read_text())
    for teachers, shipped in (("/elsewhere/clone/pipeline/shapes/demo_teachers", True), ("/tmp/my_teachers", False),
                              ("/tmp/demo_teachers", False)):
        report["config"]["teachers"] = teachers
        assert ("(the shipped demo teachers" in markdown(report)) == shipped, teachers


def test_recall_axes_start_at_a_round_value_and_say_so():
    """Both panels of recall.png cut their axis under the lowest bar; a cut axis is named in its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcad.jobs.bench.report_render import _axis_from

    fig, (a, b, c) = plt.subplots(1, 3)
    assert _axis_from(a, "rsum (%)", 436.6, margin=10.0, step=10.0) == 420.0
    assert a.get_ylim()[0] == 420.0 and a.get_ylabel() == "rsum (%), axis from 420"
    assert _axis_from(b, "recall (%)", 40.2, margin=2.0, step=5.0) == 35.0
    assert b.get_ylabel() == "recall (%), axis from 35"
    assert _axis_from(c, "recall (%)", 1.5, margin=2.0, step=5.0) == 0.0 and c.get_ylabel() == "recall (%)"
    plt.close(fig)
