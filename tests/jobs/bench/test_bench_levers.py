"""mcad bench levers at toy size, on a real toy report: stores per arm, settings per arm, paired rows, resume."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main

TOY = dict(seeds=2, quick=True, skip_speed=True, train=48, val=10, test=10, pool=8, topk=3, epochs=1,
           preset="smoke")
FIRST = ("rank:w_rank=1", "nb:pools=neighbours")
SECOND = (*FIRST, "best:pools=neighbours,w_rank=1,itm_norm=pool")  # an arm added later: the kept pass
OVERRIDES = {"rank": {"w_rank": 1.0}, "nb": {}, "best": {"w_rank": 1.0, "itm_norm": "pool"}}
NEIGHBOURS = "store_pools=neighbours"


@pytest.fixture(scope="module")
def toy_report(ray_local, teachers_dir, tmp_path_factory) -> Path:
    """A report folder as `mcad bench report` leaves it, each seed with the two students the levers bench
    reads (full MCAD and dual-only KD) and the teachers' evaluations: the report's config and flow."""
    from mcad.jobs.bench.report import ReportConfig
    from mcad.jobs.bench.report_methods import STUDENTS
    from mcad.jobs.demo import run_flow
    from mcad.storage.atomic import atomic_write_json

    cfg = ReportConfig(out=str(tmp_path_factory.mktemp("report") / "r"), teachers=str(teachers_dir), **TOY)
    Path(cfg.out).mkdir(parents=True)
    atomic_write_json(Path(cfg.out) / "report_config.json", dataclasses.asdict(cfg))
    for seed in range(cfg.seeds):
        run_flow(cfg.demo_config(seed), students={k: STUDENTS[k] for k in ("mcad", "dual_kd")},
                 echo=lambda _: None)
    return Path(cfg.out)


@pytest.fixture(scope="module")
def levers_runs(toy_report, tmp_path_factory):
    """Two arms on seed 0, then three on every seed into the same folder (seed 0's two kept)."""
    from mcad.jobs.bench.levers import LeversBenchConfig, run_levers_bench

    out = tmp_path_factory.mktemp("levers") / "l"
    cfg = LeversBenchConfig(report=str(toy_report), out=str(out), arms=FIRST, seeds="1")
    first = run_levers_bench(cfg, echo=lambda _: None)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "seed_0").rglob("*") if p.is_file()}
    lines: list[str] = []
    second = run_levers_bench(dataclasses.replace(cfg, arms=SECOND, seeds="all"), echo=lines.append)
    return out, first, files, second, lines


def _mean_r1(ranks) -> float:  # from the kept ranks, not from the EVAL dicts
    return (100 * np.mean(np.asarray(ranks["i2t"]) < 1) + 100 * np.mean(np.asarray(ranks["t2i"]) < 1)) / 2


@pytest.mark.ray
def test_levers_student_arms_reuse_the_reports_store_and_pool_arms_share_a_new_pass(levers_runs, toy_report):
    from mcad.storage.manifest import PASS_CONFIG_NAME, pass_pool_mode
    from mcad.storage.schema import PASS_POOLS, POOLS_NEIGHBOURS

    out, _, _, result, lines = levers_runs
    assert result["seeds"] == [0, 1] and result["arms"]["nb"] == {"passes": {"pools": "neighbours"},
                                                                  "overrides": {}, "spec": "nb:pools=neighbours"}
    for seed in (0, 1):
        report_seed, rows = toy_report / f"seed_{seed}", result["per_seed"][str(seed)]
        # Student overrides only: the report's own store, its pass seconds; no store folder of its own.
        assert rows["rank"]["store"] == str(report_seed / "store") and rows["rank"]["view0_is_report_store"]
        reported = json.loads((report_seed / "results.json").read_text())["seconds"]["teacher_pass"]
        assert rows["rank"]["pass_seconds"] == reported
        assert sorted(p.name for p in (out / f"seed_{seed}").iterdir() if p.name.startswith("store")) == [NEIGHBOURS]
        # pools=neighbours: one new pass that both pool arms train from, its config saying neighbours.
        store = out / f"seed_{seed}" / NEIGHBOURS
        assert rows["nb"]["store"] == rows["best"]["store"] == str(store)
        assert rows["nb"]["pass_seconds"] == rows["best"]["pass_seconds"] > 0
        assert pass_pool_mode(store) == "neighbours" and pass_pool_mode(report_seed / "store") == "consecutive"
        assert json.loads((store / PASS_CONFIG_NAME).read_text())[PASS_POOLS] == POOLS_NEIGHBOURS
        assert (store / "manifest.json").is_file() and not rows["nb"]["view0_is_report_store"]
        assert rows["nb"]["bytes_per_sample"]["total"] > 0
    passes = [line for line in lines if "teacher pass" in line]  # seed 0's pass was kept from the first run
    assert passes == ["[levers seed 1] teacher pass nb, best ({'pools': 'neighbours'}) ..."]
    md = (out / "levers.md").read_text()
    assert "| nb: pools = neighbours | new pass: pools = neighbours |" in md
    assert "| rank: w_rank = 1.0 | the report's |" in md


@pytest.mark.ray
def test_levers_arm_students_have_their_overrides_and_otherwise_the_reports_settings(levers_runs, toy_report):
    out, _, _, result, _ = levers_runs
    for seed in (0, 1):
        theirs = json.loads((toy_report / f"seed_{seed}" / "runs" / "mcad" / "train_config.json").read_text())
        for arm, overrides in OVERRIDES.items():
            ours = json.loads((out / f"seed_{seed}" / "runs" / arm / "train_config.json").read_text())
            assert ours["train"] == {**theirs["train"], **overrides}, arm
            assert ours["preset"] == theirs["preset"] and ours["train"]["seed"] == seed
            assert ours["store"] == result["per_seed"][str(seed)][arm]["store"]
            assert result["per_seed"][str(seed)][arm]["overrides"] == overrides


@pytest.mark.ray
def test_levers_paired_differences_recompute_from_the_kept_ranks(levers_runs, toy_report):
    from mcad.jobs.bench.report_stats import t975
    from mcad.jobs.demo import load_ranks

    out, _, _, result, _ = levers_runs
    compared = {"teacher_dual": {"dual_kd", "mcad", *OVERRIDES}, "dual_kd": {"mcad", *OVERRIDES},
                "mcad": set(OVERRIDES)}
    assert {ref: set(block) for ref, block in result["paired"].items()} == compared
    for ref, names in compared.items():
        for name in names:
            diffs, rsums = [], []
            for seed in (0, 1):
                report_seed = toy_report / f"seed_{seed}"
                mine = load_ranks(out / f"seed_{seed}", name) if name in OVERRIDES else load_ranks(report_seed, name)
                theirs = load_ranks(report_seed, ref)
                diffs.append(_mean_r1(mine) - _mean_r1(theirs))
                boot = result["bootstrap"][str(seed)][ref][name]["mean"]
                assert boot["diff"] == pytest.approx(diffs[-1], abs=1e-9)
                rows = result["per_seed"][str(seed)]
                rsums.append(rows[name]["test"]["rsum"] - rows[ref]["test"]["rsum"])
            got = result["paired"][ref][name]
            assert got["mean_R@1"]["mean"] == pytest.approx(statistics.fmean(diffs), abs=0.01)
            assert got["rsum"]["mean"] == pytest.approx(statistics.fmean(rsums))
            half = t975(1) * statistics.stdev(rsums) / math.sqrt(2)
            assert got["rsum"]["low"] == pytest.approx(statistics.fmean(rsums) - half)
            assert got["rsum"]["significant"] == (not got["rsum"]["low"] <= 0 <= got["rsum"]["high"])
    for seed in (0, 1):  # the references are the report's own evaluations, the arms' ranks their test EVALs
        results = json.loads((toy_report / f"seed_{seed}" / "results.json").read_text())
        rows = result["per_seed"][str(seed)]
        assert rows["mcad"]["test"] == results["students"]["mcad"]
        assert rows["dual_kd"]["test"] == results["students"]["dual_kd"]
        assert rows["teacher_dual"]["test"] == results["teachers"]["dual"]
        for arm in OVERRIDES:
            ranks = load_ranks(out / f"seed_{seed}", arm)
            assert 100 * np.mean(ranks["i2t"] < 1) == pytest.approx(rows[arm]["test"]["i2t"]["R@1"], abs=0.01)
    md = (out / "levers.md").read_text()
    assert result["command"] in md and "--arm best:pools=neighbours,w_rank=1.0,itm_norm=pool" in result["command"]
    d = result["paired"]["dual_kd"]["best"]["mean_R@1"]
    assert f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" in md
    table = [line for line in md.splitlines() if line.startswith("| best: ")]
    assert table and all("best: pools = neighbours, w_rank = 1.0, itm_norm = pool" in line for line in table)


@pytest.mark.ray
def test_levers_resume_keeps_finished_results(levers_runs):
    out, first, files, second, lines = levers_runs
    assert first["seeds"] == [0] and first["kept"] == {"0": []} and set(first["arms"]) == {"rank", "nb"}
    assert second["kept"] == {"0": ["rank", "nb"], "1": []}
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "result_nb.json" for p in files)
    for path, (mtime, data) in files.items():  # nothing of the first run was trained or written again
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert second["per_seed"]["0"]["nb"] == first["per_seed"]["0"]["nb"]
    assert any(line.startswith("[levers seed 0] nb: finished before, kept") for line in lines)
    config = json.loads((out / "levers_config.json").read_text())
    assert config["seeds"] == "all" and set(config["arms"]) == {"rank", "nb", "best"}


@pytest.mark.ray
def test_levers_refuse_bad_arms_in_one_line_before_any_work(levers_runs, toy_report, tmp_path):
    def run(*args, out=tmp_path / "l"):
        return CliRunner().invoke(main, ["bench", "levers", "--report", str(toy_report), "--out", str(out), *args])

    for arms, words in ((["x:foo=1"], "unknown key 'foo'"), (["x:w_rank=-1"], "w_rank must be >= 0"),
                        (["x:pools=near"], "pools must be one of consecutive, neighbours"),
                        (["x:epochs=3"], "epochs is the report's"), (["mcad:w_rank=1"], "the name of a reference"),
                        (["x:pools=consecutive"], "changes nothing"), (["x w_rank=1"], "expected NAME:KEY=V"),
                        (["a:w_rank=1", "a:beta=0"], "a named twice"),
                        (["a:w_rank=1", "b:w_rank=1.0"], "a and b change the same settings")):
        result = run(*(f"--arm={a}" for a in arms))
        assert result.exit_code == 2 and words in result.output, (arms, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = run("--arm", "x:w_rank=1", "--seeds", "3")
    assert result.exit_code == 2 and "has 2 seed(s)" in result.output
    assert not (tmp_path / "l").exists()
    # An arm name that now means other overrides, in a folder that holds it: refused, nothing rewritten.
    out = levers_runs[0]
    before = {p: p.read_bytes() for p in (out / "levers.json", out / "levers_config.json")}
    result = run("--arm", "rank:w_rank=0.5", out=out)
    assert result.exit_code == 2 and "arm rank was run with" in result.output
    assert {p: p.read_bytes() for p in before} == before
    # A report without the dual-only KD student: not a report the levers can be paired with.
    unfinished = tmp_path / "r"
    (unfinished / "seed_0").mkdir(parents=True)
    (unfinished / "report_config.json").write_text(json.dumps({"seeds": 1}))
    results = json.loads((toy_report / "seed_0" / "results.json").read_text())
    del results["students"]["dual_kd"]
    (unfinished / "seed_0" / "results.json").write_text(json.dumps(results))
    result = CliRunner().invoke(main, ["bench", "levers", "--report", str(unfinished), "--out", str(tmp_path / "l"),
                                       "--arm", "x:w_rank=1"])
    assert result.exit_code == 2 and "seed(s) 0 not finished" in result.output
    assert not (tmp_path / "l").exists()
    result = CliRunner().invoke(main, ["bench", "levers", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output
