"""mcad bench views at toy size, on a real toy report: caption truth, the val choice, paired test rows, resume."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main

TOY = dict(seeds=2, quick=True, skip_speed=True, train=48, val=10, test=10, pool=8, topk=3, epochs=1,
           preset="smoke")
SCALES = "0.1-0.3,1-1"  # a range that loses objects, and whole images
SETTINGS = "4x1,3x2"


@pytest.fixture(scope="module")
def toy_report(ray_local, teachers_dir, tmp_path_factory) -> Path:
    """A report folder as `mcad bench report` leaves it, each seed with the full-MCAD student only (the
    one student the views bench reads): the report's own config and flow (jobs.demo.run_flow)."""
    from mcad.jobs.bench.report import ReportConfig
    from mcad.jobs.bench.report_methods import STUDENTS
    from mcad.jobs.demo import run_flow
    from mcad.storage.atomic import atomic_write_json

    cfg = ReportConfig(out=str(tmp_path_factory.mktemp("report") / "r"), teachers=str(teachers_dir), **TOY)
    Path(cfg.out).mkdir(parents=True)
    atomic_write_json(Path(cfg.out) / "report_config.json", dataclasses.asdict(cfg))
    for seed in range(cfg.seeds):
        run_flow(cfg.demo_config(seed), students={"mcad": STUDENTS["mcad"]}, echo=lambda _: None)
    return Path(cfg.out)


@pytest.fixture(scope="module")
def views_runs(toy_report, tmp_path_factory):
    """The bench on seed 0 only, then again on every seed into the same folder (seed 0 kept)."""
    from mcad.jobs.bench.views import ViewsBenchConfig, run_views_bench

    out = tmp_path_factory.mktemp("views") / "v"
    cfg = ViewsBenchConfig(report=str(toy_report), out=str(out), settings=SETTINGS, crop_scales=SCALES, seeds="1")
    first = run_views_bench(cfg, echo=lambda _: None)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
             if p.is_file() and (p.name == "model.safetensors" or p.name.startswith("result"))}
    lines: list[str] = []
    second = run_views_bench(dataclasses.replace(cfg, seeds="all"), echo=lines.append)
    return out, first, files, second, lines


def _last_val_rsum(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "epoch"][-1]["val_rsum"]


def test_caption_truth_is_whole_for_whole_images_and_lower_for_small_crops(shapes_data):
    from mcad.jobs.bench.views_tables import caption_truth

    truth = caption_truth(shapes_data, [(1.0, 1.0), (0.1, 0.2), (0.5, 1.0)], (0.75, 4 / 3), views=8)
    by = truth["by_range"]
    assert truth["images"] == 10 and by["1-1"]["crops"] == 70
    assert by["1-1"]["captions_true"] == 1.0 and by["1-1"]["all_whole"] == 1.0
    assert by["0.1-0.2"]["captions_true"] < by["0.5-1"]["captions_true"] <= 1.0
    assert by["0.1-0.2"]["crop_area_mean"] == pytest.approx(0.15, abs=0.03)
    assert "at least 50% of its bounding box" in truth["definition"]


def test_caption_truth_counts_an_object_by_its_box_in_the_crop(shapes_data):
    """Recomputed by hand for the boxes the pass draws for val shard 000000, view 1: an object counts as
    visible with half its box inside the crop, and keeps its size word when, resized back, its half-width
    stays on its side of the geometric mean of the two sizes."""
    from mcad.jobs.bench.views_tables import caption_truth
    from mcad.pipeline.shapes.synth import SynthConfig, held_out_meanings, split_scenes
    from mcad.pipeline.shapes.world import SIZES, half_width
    from mcad.pipeline.views import ViewConfig, pixel_box

    cfg = SynthConfig(train=60, val=10, test=10, shard_size=20, seed=0)
    scenes = [s for s, _, _ in split_scenes("val", cfg, held_out_meanings("val", cfg))]
    views = ViewConfig(n=2, crop_scale=(0.2, 0.4), seed=0)
    boxes = views.boxes("000000", range(10), [(48, 48)] * 10)[:, 0]  # the pass's own boxes
    visible = true = sized = 0
    for scene, box in zip(scenes, boxes):
        left, top, right, bottom = pixel_box(box, 48, 48)
        ok, size_ok = True, True
        for o in scene.objects:
            h = half_width(o.size, 48)
            inside = max(0, min(o.x + h, right) - max(o.x - h, left)) * max(0, min(o.y + h, bottom) - max(o.y - h, top))
            ok &= inside >= 0.5 * (2 * h) ** 2
            for zoom in (48 / (right - left), 48 / (bottom - top)):
                size_ok &= (h * zoom / 48 > (0.10 * 0.17) ** 0.5) == (o.size == "large")
        visible, sized, true = visible + ok, sized + size_ok, true + (ok and size_ok)
    assert SIZES == {"small": 0.10, "large": 0.17}
    got = caption_truth(shapes_data, [(0.2, 0.4)], (0.75, 4 / 3), views=2)["by_range"]["0.2-0.4"]
    assert got["crops"] == 10 and got["objects_visible"] == pytest.approx(visible / 10)
    assert got["sizes_kept"] == pytest.approx(sized / 10) and got["captions_true"] == pytest.approx(true / 10)
    assert sized < 10  # zooms of 1.6-2.2: some small object reads as large
    whole = caption_truth(shapes_data, [(1.0, 1.0)], (1.0, 1.0), views=2)["by_range"]["1-1"]
    assert whole["sizes_kept"] == whole["captions_true"] == 1.0


@pytest.mark.ray
def test_views_choose_the_range_with_the_higher_val_rsum(views_runs):
    out, first, _, _, _ = views_runs
    sel = first["selection"]
    assert list(sel["candidates"]) == ["0.1-0.3", "1-1"] and sel["split"] == "val"
    rsums = {k: _last_val_rsum(out / "select" / f"scale_{k}" / "runs" / "mcad") for k in sel["candidates"]}
    assert {k: c["val_rsum"] for k, c in sel["candidates"].items()} == rsums
    best = max(rsums.values())
    assert sel["chosen"] == next(k for k, v in rsums.items() if v == best)  # the first on a tie
    for k, c in sel["candidates"].items():  # a 4x1 pass at that range; no test figure in the selection
        manifest = json.loads((out / "select" / f"scale_{k}" / "store" / "manifest.json").read_text())
        assert manifest["views"]["n"] == 4 and manifest["views"]["m"] == 1
        assert manifest["views"]["crop_scale"] == c["crop_scale"] and "test" not in c
    truth = first["caption_truth"]["by_range"]
    assert truth["1-1"]["captions_true"] == 1.0 and truth["0.1-0.3"]["captions_true"] < 1.0


@pytest.mark.ray
def test_views_rows_are_paired_with_the_reports_one_view_student(views_runs, toy_report):
    from mcad.jobs.demo import load_ranks

    out, _, _, report, _ = views_runs
    chosen = report["selection"]["chosen"]
    assert report["seeds"] == [0, 1] and set(report["settings"]) == {"1x1", "4x1", "3x2"}

    def mean_r1(ranks):  # recomputed from the kept ranks, not from the EVAL dicts
        owner_hits = np.asarray(ranks["t2i"]) < 1
        return (100 * np.mean(np.asarray(ranks["i2t"]) < 1) + 100 * np.mean(owner_hits)) / 2

    for name in ("4x1", "3x2"):
        n, m = (int(x) for x in name.split("x"))
        diffs = []
        for seed in (0, 1):
            row = report["per_seed"][str(seed)][name]
            manifest = json.loads((Path(row["store"]) / "manifest.json").read_text())
            assert manifest["views"]["n"] == n and manifest["views"]["m"] == m and manifest["views"]["seed"] == seed
            assert manifest["views"]["crop_scale"] == list(report["selection"]["candidates"][chosen]["crop_scale"])
            assert row["view0_is_report_store"] is True  # view 0 is the report's store: only the views differ
            assert row["views"]["per_sample"] == n and row["bytes_per_sample"]["views"] > 0
            ours = json.loads((Path(row["run"]) / "train_config.json").read_text())
            theirs = json.loads((toy_report / f"seed_{seed}" / "runs" / "mcad" / "train_config.json").read_text())
            assert ours["train"] == theirs["train"] and ours["preset"] == theirs["preset"]
            a, b = load_ranks(out / f"seed_{seed}", name), load_ranks(toy_report / f"seed_{seed}", "mcad")
            diffs.append(mean_r1(a) - mean_r1(b))
            boot = report["bootstrap"][str(seed)][name]["mean"]
            assert boot["diff"] == pytest.approx(diffs[-1], abs=1e-9)
        paired = report["paired"][name]["mean_R@1"]
        assert paired["mean"] == pytest.approx(np.mean(diffs), abs=0.01) and paired["n"] == 2
        assert paired["low"] < paired["mean"] < paired["high"] or paired["low"] == paired["high"]
    # The reference is the report's own run: its test EVAL, and the machine's seconds per student.
    for seed in (0, 1):
        results = json.loads((toy_report / f"seed_{seed}" / "results.json").read_text())
        ref = report["per_seed"][str(seed)]["1x1"]
        assert ref["test"] == results["students"]["mcad"] and ref["students_side_by_side"] == 1
        assert ref["student_seconds"] == pytest.approx(results["seconds"]["students"], abs=0.01)
        assert report["per_seed"][str(seed)]["3x2"]["students_side_by_side"] == 1 + seed  # seed 0: 4x1 adopted
    # Seed 0's 4x1 is the selection's winning run, not a second one.
    row = report["per_seed"]["0"]["4x1"]
    assert row["from_selection"] and row["model"] == report["selection"]["candidates"][chosen]["model"]
    assert not report["per_seed"]["1"]["4x1"]["from_selection"]
    md = (out / "views.md").read_text()
    assert report["command"] in md and f"--settings {SETTINGS}" in report["command"]
    assert f"**Chosen: {chosen}.**" in md and "at least 50% of its bounding box" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1x1: ", "| 4x1: ", "| 3x2: "))]
    assert [r[2:5] for r in rows] == ["1x1", "4x1", "3x2"]  # the reference, then the settings as given
    d = report["paired"]["3x2"]["rsum"]
    assert f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" in md


@pytest.mark.ray
def test_views_resume_keeps_finished_results(views_runs):
    out, first, files, second, lines = views_runs
    assert first["seeds"] == [0] and first["kept"] == {"0": []}
    assert second["kept"] == {"0": ["4x1", "3x2"], "1": []}
    assert second["selection"]["kept"] == ["0.1-0.3", "1-1"]
    for path, (mtime, data) in files.items():  # nothing of the first run was trained or written again
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert second["per_seed"]["0"]["3x2"]["test"] == first["per_seed"]["0"]["3x2"]["test"]
    assert any(line.startswith("[views seed 0] 3x2: finished before, kept") for line in lines)
    assert json.loads((out / "views_config.json").read_text())["seeds"] == "all"


@pytest.mark.ray
def test_views_refuse_a_folder_made_with_other_settings(views_runs, toy_report):
    out = views_runs[0]
    before = (out / "views.json").read_bytes()
    result = CliRunner().invoke(main, ["bench", "views", "--report", str(toy_report), "--out", str(out),
                                       "--settings", SETTINGS, "--crop-scales", "0.5-1,1-1"])
    assert result.exit_code == 2 and "crop_scales: '0.1-0.3,1-1' -> '0.5-1,1-1'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and (out / "views.json").read_bytes() == before


@pytest.mark.ray
def test_views_cli_refuses_bad_input_before_any_work(toy_report, tmp_path):
    def run(*args):
        return CliRunner().invoke(main, ["bench", "views", "--report", str(toy_report), "--out",
                                         str(tmp_path / "v"), *args])

    for args, words in ((["--settings", "4x5"], "1 <= M <= N"), (["--settings", "1x1"], "N must be at least 2"),
                        (["--settings", "4by1"], "is not NxM"), (["--crop-scales", "0.5-1.2"], "HI <= 1"),
                        (["--crop-scales", "0.5-1,0.5-1.0"], "names one range twice"),
                        (["--seeds", "3"], "has 2 seed(s)"), (["--seeds", "none"], "'all' or a positive")):
        result = run(*args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
    assert not (tmp_path / "v").exists()
    unfinished = tmp_path / "r"
    unfinished.mkdir()
    (unfinished / "report_config.json").write_text(json.dumps({"seeds": 1}))
    result = CliRunner().invoke(main, ["bench", "views", "--report", str(unfinished), "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and "seed(s) 0 not finished" in result.output
    result = CliRunner().invoke(main, ["bench", "views", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output


def test_teacher_on_crops_scores_the_crops_the_pass_would_cut(shapes_data, tiny_teachers, tmp_path):
    """Whole images and an identity crop give the same recall; each written crop is apply_box of the
    pass's own box for that shard and row (view 1), pixel for pixel."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from mcad.jobs.bench.views_tables import teacher_on_crops
    from mcad.pipeline.views import ViewConfig, apply_box

    got = teacher_on_crops(shapes_data, tiny_teachers[0], [(1.0, 1.0), (0.2, 0.3)], (1.0, 1.0), tmp_path)
    assert {k: v for k, v in got["by_range"]["1-1"].items() if k != "crop_scale"} == got["whole"]
    with tarfile.open(shapes_data / "val" / "000000.tar") as tar:
        originals = [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                     for m in tar.getmembers() if m.name.endswith(".jpg")]
    boxes = ViewConfig(n=2, crop_scale=(0.2, 0.3), crop_ratio=(1.0, 1.0), seed=0).boxes(
        "000000", range(len(originals)), [im.size for im in originals])[:, 0]
    with tarfile.open(tmp_path / "crops_0.2-0.3" / "000000.tar") as tar:
        crops = [Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".png")]
    assert len(crops) == len(originals) == 10
    for crop, image, box in zip(crops, originals, boxes):
        assert np.array_equal(np.asarray(crop), np.asarray(apply_box(image, box)))
