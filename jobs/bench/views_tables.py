"""`mcad bench views`'s figures: caption truth of crops, the comparison with N = 1, and OUT/views.md.

- `caption_truth`: how often a crop keeps every caption true, from the scenes
  alone (no rendering, no model): the val split's scenes of the benchmark are
  regenerated from its SynthConfig (pipeline/shapes/synth.py split_scenes, the
  shards' own generator), each crop is the box a pass would draw for that
  shard and row (pipeline.views.draw_box / view_rng), cut as apply_box cuts it
  (pipeline.views.pixel_box).
- `compare`: per setting, mean and sd over seeds of the final val rsum, test
  R@1 and rsum, pass and student seconds and bytes per sample; each setting
  minus the same seed's N = 1 full MCAD (jobs/bench/arms_tables.compare: a
  95 % t-interval over seeds, and per seed a paired bootstrap over the test
  queries).
- `markdown`: OUT/views.md, tables a README can quote.

The run itself is jobs/bench/views.py.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

VISIBLE = 0.5  # share of an object's bounding box a crop must keep for the object to count as visible
TRUTH_DEFINITION = (
    "a crop keeps its captions true when every object the captions name (every object of the scene: each "
    f"caption names them all) keeps at least {VISIBLE:.0%} of its bounding box (centre ± the shape's half-width, "
    "the box it is drawn in) inside the crop's pixel edges (pipeline.views.pixel_box, what apply_box cuts), and "
    "keeps its size word: resized back to the image's size, its half-width along each axis stays on the same "
    "side of the geometric mean of the small and large half-widths. Relations cannot change: a scene's pair is "
    "at most ~27 degrees off its main axis (world.is_valid), and a crop's aspect change (at most 4/3 over 3/4) "
    "would need a factor of 2 to swap the axes")


def caption_truth(data: Path, scales: list[tuple[float, float]], ratio: tuple[float, float], *, views: int,
                  seed: int = 0) -> dict:
    """Per crop-scale range, over views 1..views-1 of every val image of the benchmark in `data` (view seed
    `seed`): the share of crops keeping every named object visible (TRUTH_DEFINITION), every object whole,
    and the mean visible share of an object and mean area share of a crop."""
    from mcad.pipeline.shapes.synth import CONFIG_NAME, SynthConfig, held_out_meanings, split_scenes
    from mcad.pipeline.shapes.world import SIZES, half_width, photo_width
    from mcad.pipeline.views import draw_box, pixel_box, view_rng

    synth = SynthConfig(**json.loads((Path(data) / CONFIG_NAME).read_text())["config"])
    scenes = [scene for scene, _, _ in split_scenes("val", synth, held_out_meanings("val", synth))]
    _check_scenes(Path(data) / "val", scenes)
    side = synth.image_size
    width = photo_width(side) if synth.texture == "photo" else side
    offset = (width - side) // 2  # the photo frame draws the scene in its middle square
    boundary = math.sqrt(SIZES["small"] * SIZES["large"]) * side  # a half-width above it reads as large

    def size_kept(o, h: float, sx: float, sy: float) -> bool:
        return all((h * f > boundary) == (o.size == "large") for f in (sx, sy))

    by_range = {}
    for scale in scales:
        crops = []  # per crop: (each object's visible share, the crop's area share, every size word kept)
        for index, scene in enumerate(scenes):
            shard, row = f"{index // synth.shard_size:06d}", index % synth.shard_size
            for v in range(1, views):
                box = draw_box(view_rng(seed, shard, row, v), width, side, scale=scale, ratio=ratio)
                left, top, right, bottom = pixel_box(box, width, side)
                sx, sy = width / (right - left), side / (bottom - top)  # the crop resized back to the image
                shares, sizes = [], True
                for o in scene.objects:
                    h = half_width(o.size, side)
                    dx = min(o.x + offset + h, right) - max(o.x + offset - h, left)
                    dy = min(o.y + h, bottom) - max(o.y - h, top)
                    shares.append(max(dx, 0.0) * max(dy, 0.0) / (2 * h) ** 2)
                    sizes = sizes and size_kept(o, h, sx, sy)
                crops.append((shares, (right - left) * (bottom - top) / (width * side), sizes))
        by_range[f"{scale[0]:g}-{scale[1]:g}"] = {
            "crop_scale": list(scale), "crops": len(crops),
            "captions_true": statistics.fmean(min(s) >= VISIBLE and k for s, _, k in crops),
            "objects_visible": statistics.fmean(min(s) >= VISIBLE for s, _, _ in crops),
            "sizes_kept": statistics.fmean(k for _, _, k in crops),
            "all_whole": statistics.fmean(min(s) >= 1.0 - 1e-9 for s, _, _ in crops),
            "object_visible_mean": statistics.fmean(x for s, _, _ in crops for x in s),
            "crop_area_mean": statistics.fmean(a for _, a, _ in crops)}
    return {"definition": TRUTH_DEFINITION, "split": "val", "images": len(scenes),
            "views_per_image": views - 1, "view_seed": seed, "crop_ratio": list(ratio),
            "image": [width, side], "by_range": by_range}


def teacher_on_crops(data: Path, dual: Path, scales: list[tuple[float, float]], ratio: tuple[float, float],
                     out: Path, *, seed: int = 0) -> dict:
    """The dual teacher's val recall on whole images and, per crop-scale range, on every val image replaced
    by its view-1 crop (the box a pass with view seed `seed` draws for that shard and row, cut by
    pipeline.views.apply_box, kept lossless as PNG in OUT/crops_LO-HI/): how good the targets it stores for
    crops are, next to those for whole images."""
    import io
    import tarfile

    from PIL import Image

    from mcad.pipeline.evaluate import evaluate
    from mcad.pipeline.shards import IMAGE_EXTS
    from mcad.pipeline.views import ViewConfig, apply_box

    def figures(ev: dict) -> dict:
        return {"i2t_R@1": ev["i2t"]["R@1"], "t2i_R@1": ev["t2i"]["R@1"], "rsum": ev["rsum"]}

    shards = sorted((Path(data) / "val").glob("*.tar"))
    result = {"split": "val", "view_seed": seed, "whole": figures(evaluate(dual, str(Path(data) / "val"))),
              "by_range": {}}
    for scale in scales:
        name = f"{scale[0]:g}-{scale[1]:g}"
        folder = out / f"crops_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        views = ViewConfig(n=2, crop_scale=scale, crop_ratio=ratio, seed=seed)
        for shard in shards:
            with tarfile.open(shard) as tin, tarfile.open(folder / shard.name, "w") as tout:
                members = tin.getmembers()
                images = [m for m in members if m.name.rpartition(".")[2].lower() in IMAGE_EXTS]
                decoded = [Image.open(io.BytesIO(tin.extractfile(m).read())).convert("RGB") for m in images]
                boxes = views.boxes(shard.stem, range(len(images)), [im.size for im in decoded])[:, 0]
                crops = {m.name: (im, box) for m, im, box in zip(images, decoded, boxes)}
                for m in members:
                    name_in, payload = m.name, tin.extractfile(m).read()
                    if name_in in crops:
                        buf = io.BytesIO()
                        apply_box(*crops[name_in]).save(buf, format="PNG")
                        name_in, payload = name_in.rpartition(".")[0] + ".png", buf.getvalue()
                    info = tarfile.TarInfo(name_in)
                    info.size = len(payload)
                    tout.addfile(info, io.BytesIO(payload))
        result["by_range"][name] = {"crop_scale": list(scale), **figures(evaluate(dual, str(folder)))}
    return result


def _check_scenes(split: Path, scenes: list) -> None:
    """Refuse scenes that are not the ones the first val shard holds (its samples' "objects")."""
    import dataclasses
    import tarfile

    from mcad.storage.errors import InputError

    shard = split / "000000.tar"
    with tarfile.open(shard) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    for meta, scene in zip(sorted(metas, key=lambda m: m["key"]), scenes):
        if meta["objects"] != [dataclasses.asdict(o) for o in scene.objects]:
            raise InputError(f"{shard}: sample {meta['key']} is not the scene its synth_config.json draws")


# ------------------------------------------------------------------ the comparison with N = 1

def compare(report: Path, out: Path, seeds: list[int], per_seed: dict[int, dict], refs: dict[int, dict]) -> dict:
    """{"settings": per setting (the reference first) its means over seeds, "paired": setting -> metric ->
    paired_interval of (setting - reference), "bootstrap": seed -> setting -> paired_bootstrap}
    (arms_tables.compare with the report's one-view full MCAD as the one reference)."""
    from mcad.jobs.bench.arms_tables import compare as compare_arms
    from mcad.jobs.bench.views import REFERENCE

    runs = {s: {REFERENCE: refs[s], **per_seed[s]} for s in seeds}
    found = compare_arms(report, out, seeds, runs, {REFERENCE: "mcad"})
    return {"settings": found["summary"], "paired": found["paired"][REFERENCE],
            "bootstrap": {s: block[REFERENCE] for s, block in found["bootstrap"].items()}}


# ------------------------------------------------------------------ OUT/views.md

def _label(name: str) -> str:
    if name == "1x1":
        return "1 view (the report's store)"
    n, m = name.split("x")
    return f"{n} views, {m} scored by the single teacher"


def _bytes(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1024:.1f} KiB"


def _order(result: dict) -> list[str]:
    """The reference, then the settings in the order given (views.json's keys are sorted)."""
    return ["1x1", *result["config"]["settings"].split(",")]


def main_table(result: dict) -> list[str]:
    from mcad.jobs.bench.report_render import ci_text, md_table, pm_text

    rows = [["views NxM", "val rsum (last epoch)", "test mean R@1", "test rsum", "Δ mean R@1 vs 1 view",
             "Δ rsum vs 1 view", "pass s", "student s", "store bytes / sample (signals + views = total)"]]
    for name in _order(result):
        s, d = result["settings"][name], result["paired"].get(name)
        b = s["bytes_per_sample"]
        rows.append([f"{name}: {_label(name)}", pm_text(s["val_rsum"], 2) if s["val_rsum"] else "n/a",
                     pm_text(s["test_mean_R@1"]), pm_text(s["test_rsum"]),
                     ci_text(d["mean_R@1"]) if d else "reference", ci_text(d["rsum"]) if d else "reference",
                     pm_text(s["pass_seconds"], 0) if s["pass_seconds"] else "n/a",
                     pm_text(s["student_seconds"], 0) if s["student_seconds"] else "n/a",
                     f"{_bytes(b['signals'])} + {_bytes(b['views'])} = {_bytes(b['total'])}"])
    return md_table(rows)


def markdown(result: dict) -> str:
    from mcad.jobs.bench.report_render import boot_text, md_table

    truth, sel, seeds = result["caption_truth"], result["selection"], result["seeds"]
    lines = ["# Stored views on the shapes benchmark (issue #17)", "",
             f"    {result['command']}", "",
             f"Reuses the report in `{result['pinned']['report']}` (seeds {', '.join(map(str, seeds))}): its "
             "benchmark, teachers, and its full-MCAD student from the one-view store, the reference each setting "
             "is paired with (same seed, same data, same student settings and initialisation; only the store "
             "differs). Crop ratio "
             f"{truth['crop_ratio'][0]:.3g}-{truth['crop_ratio'][1]:.3g} (the pass's default).", "",
             "## Which crop range keeps the captions true", "",
             f"Over seed 0's {truth['images']} val images, {truth['views_per_image']} crops each (the boxes a pass "
             f"with view seed {truth['view_seed']} draws): {truth['definition']}.", ""]
    rows = [["crop scale", "crops", "captions true", "objects visible", "size words kept", "every object whole",
             "mean object visible", "mean crop area"]]
    rows += [[k, str(r["crops"]), f"{r['captions_true']:.1%}", f"{r.get('objects_visible', r['captions_true']):.1%}",
              f"{r['sizes_kept']:.1%}" if "sizes_kept" in r else "n/a", f"{r['all_whole']:.1%}",
              f"{r['object_visible_mean']:.1%}", f"{r['crop_area_mean']:.1%}"] for k, r in truth["by_range"].items()]
    crops = result.get("teacher_on_crops")
    if crops:
        lines += [*md_table(rows), "", "## The dual teacher on crops", "",
                  f"Its recall on seed 0's val split, whole images against each image replaced by one crop (view 1 "
                  f"of view seed {crops['view_seed']}, as the pass cuts it): the targets it stores for a crop are "
                  "only as good as this.", ""]
        rows = [["images", "i2t R@1", "t2i R@1", "rsum"],
                ["whole", *(f"{crops['whole'][k]:.1f}" for k in ("i2t_R@1", "t2i_R@1", "rsum"))]]
        rows += [[f"crops {k}", *(f"{r[k2]:.1f}" for k2 in ("i2t_R@1", "t2i_R@1", "rsum"))]
                 for k, r in crops["by_range"].items()]
    lines += [*md_table(rows), "", "## The crop range, chosen on val", "",
              f"Seed {sel['seed']}, {_label(sel['setting'])} ({sel['setting']}), one full-MCAD student per range, "
              f"val split only (test not read). Rule: {sel['rule']}. **Chosen: {sel['chosen']}.**", ""]
    rows = [["crop scale", "val rsum (last epoch)", "pass s", "student s"]]
    rows += [[k, f"{c['val_rsum']:.2f}", f"{c['pass_seconds']:.0f}", f"{c['student_seconds']:.0f}"]
             for k, c in sel["candidates"].items()]
    lines += [*md_table(rows), "",
              f"## Test: full MCAD from stored views, crop scale {sel['chosen']}, {len(seeds)} seed(s)", "",
              "Mean ± sd over seeds; Δ: each setting minus the same seed's one-view student, mean and its 95 % "
              "interval over seeds (mean ± t(0.975, n−1)·sd/√n; \"not significant\": it covers 0). Mean R@1 is "
              "the average of i2t and t2i R@1. Seconds on this machine "
              f"({result['machine'].get('cpus')} CPUs); student s: the wall time of the students trained side by "
              "side over their number (the machine's seconds per student, as the report's cost). "
              f"Seed {sel['seed']}'s {sel['setting']} is the selection's winning run, evaluated on test once.", "",
              *main_table(result), ""]
    boot = result["bootstrap"]
    first = next(iter(boot[str(seeds[0])].values()))
    lines += ["## Per seed: paired bootstrap over the test queries", "",
              f"Δ mean R@1 against the same seed's one-view student, {first['level']:.0%} percentile interval from "
              f"{first['n_boot']} paired resamples of the test images (an image with its captions is the unit).", ""]
    rows = [["views NxM", *(f"seed {s}" for s in seeds)]]
    rows += [[name, *(boot_text(boot[str(s)][name]["mean"]) for s in seeds)] for name in _order(result)[1:]]
    return "\n".join(lines + [*md_table(rows), ""])


def summary_text(result: dict) -> str:
    """The test table, for the terminal."""
    return "\n".join(main_table(result))
