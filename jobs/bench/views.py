"""`mcad bench views`: the stored-views measurement of issue #17, on a finished `mcad bench report`.

The report folder DIR gives, per seed N, the benchmark (DIR/seed_N/data), the
teachers, the N = 1 store and the full-MCAD student trained from it
(runs/mcad, ranks/mcad.npz): the reference every views setting is paired with.
Three phases, then the tables (jobs/bench/views_tables.py):

1. Caption truth, no training (`views_tables.caption_truth`): for each candidate
   crop-scale range, the boxes a pass would draw (pipeline.views.draw_box and
   view_rng, keyed by view seed 0, shard and row as the pass keys them) over
   seed 0's val scenes, regenerated from the benchmark's SynthConfig; the share
   of crops in which every object the captions name keeps at least half of its
   bounding box (views_tables.TRUTH_DEFINITION).
2. The crop range, chosen on val (seed 0; test is not read): per candidate a
   pass at 4 views, 1 scored by the single teacher (OUT/select/scale_LO-HI/),
   and a full-MCAD student trained from it with its val split; the range with
   the higher val rsum at the last epoch wins (the first given on a tie).
3. Test rows: per seed of the report (or the first K) and setting NxM, a pass
   of N views, the first M scored by the single teacher, at the chosen range
   with view seed N (OUT/seed_N/store_NxM), then the seed's students trained
   side by side (jobs.demo.train_side_by_side) with the report's full-MCAD
   settings (checked against the report's runs/mcad/train_config.json), each
   evaluated once on test (OUT/seed_N/ranks/NxM.npz): one arm per setting of
   jobs/bench/arms.py (its passes, students, results and resume). Seed 0's 4x1 is the
   selection's winning run (the same pass and student), evaluated on test here.
   Each setting minus the same seed's N = 1 full MCAD: the paired difference
   with a 95 % t-interval over seeds (report_stats.paired_differences), and per
   seed a paired bootstrap over the test queries (student.metrics).

Outputs: OUT/views.json, OUT/views.md, and OUT/views_config.json, which pins
the report, the candidate ranges, the crop ratio and the student settings: an
OUT made with others is refused. A selection candidate whose
OUT/select/scale_LO-HI/result.json exists, and a (seed, setting) whose
OUT/seed_N/result_NxM.json exists, are kept (a stopped run restarts there).

    mcad bench views --report report/ --out views/
    mcad bench views --report /tmp/r --out /tmp/v --settings 4x1,3x2 --crop-scales 0.3-1,1-1 --seeds 1

Nothing heavy (torch, pyarrow, Ray) is imported at module level.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mcad.jobs.bench.arms import parse_seeds
from mcad.jobs.teacher_pass_job import TeacherPassJob
from mcad.storage.errors import InputError

CONFIG_NAME, RESULT_NAME, SELECT_DIR = "views_config.json", "result.json", "select"
SELECT_SETTING = (4, 1)  # the views setting the crop range is chosen with
REFERENCE = "1x1"        # the report's own full MCAD: one view per sample, the N = 1 store
# What a views folder's results depend on: one made with other values is refused.
PINNED = ("report", "report_config", "crop_scales", "crop_ratio", "select_setting", "student")


@dataclass(frozen=True)
class ViewsBenchConfig:
    report: str = "report"
    out: str = "views_out"
    settings: str = "4x1,8x1,4x2"        # NxM: N views per sample, the first M scored by the single teacher
    crop_scales: str = "0.5-1.0,0.8-1.0"  # candidate crop-scale ranges, one chosen on val
    seeds: str = "all"                     # "all": every seed of the report; K: the first K
    ray_address: str | None = None
    crop_ratio: tuple[float, float] = TeacherPassJob.crop_ratio  # the pass's default; Python only

    def __post_init__(self):  # canonical spellings, so the pinned values compare
        object.__setattr__(self, "settings", ",".join(f"{n}x{m}" for n, m in parse_settings(self.settings)))
        object.__setattr__(self, "crop_scales", ",".join(_scale_name(s) for s in parse_scales(self.crop_scales)))
        object.__setattr__(self, "seeds", parse_seeds(self.seeds))
        object.__setattr__(self, "crop_ratio", tuple(float(x) for x in self.crop_ratio))

    def setting_list(self) -> list[tuple[int, int]]:
        return list(parse_settings(self.settings))

    def scale_list(self) -> list[tuple[float, float]]:
        return list(parse_scales(self.crop_scales))

    def command(self) -> str:
        """The command line that runs this configuration."""
        extra = f" --ray-address {self.ray_address}" if self.ray_address else ""
        return (f"mcad bench views --report {self.report} --out {self.out} --settings {self.settings} "
                f"--crop-scales {self.crop_scales} --seeds {self.seeds}{extra}")


def _parts(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise InputError(f"{what}: give at least one")
    if len(set(parts)) < len(parts):
        raise InputError(f"{what}: {text!r} names one twice")
    return parts


def parse_settings(text: str) -> tuple[tuple[int, int], ...]:
    """"4x1,8x1" -> ((4, 1), (8, 1)); N >= 2 (N = 1 is the report's own store), 1 <= M <= N."""
    out = []
    for part in _parts(text, "settings"):
        n, _, m = part.lower().partition("x")
        if not (n.isdigit() and m.isdigit()):
            raise InputError(f"settings: {part!r} is not NxM (N views per sample, M scored by the single teacher)")
        n, m = int(n), int(m)
        if n < 2 or not 1 <= m <= n:
            raise InputError(f"settings: {part}: N must be at least 2 (N = 1 is the report's own store) "
                             f"and 1 <= M <= N")
        out.append((n, m))
    if len(set(out)) < len(out):
        raise InputError(f"settings: {text!r} names one twice")
    return tuple(out)


def parse_scales(text: str) -> tuple[tuple[float, float], ...]:
    """"0.5-1.0,0.8-1" -> ((0.5, 1.0), (0.8, 1.0)); each range 0 < LO <= HI <= 1."""
    out = []
    for part in _parts(text, "crop scales"):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = float(lo), float(hi)
        except ValueError:
            raise InputError(f"crop scales: {part!r} is not LO-HI (shares of the image area)") from None
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop scales: {part}: a range must satisfy 0 < LO <= HI <= 1")
        out.append((lo, hi))
    if len(set(out)) < len(out):
        raise InputError(f"crop scales: {text!r} names one range twice")
    return tuple(out)


def _scale_name(scale: tuple[float, float]) -> str:
    return f"{scale[0]:g}-{scale[1]:g}"


def setting_name(n: int, m: int) -> str:
    return f"{n}x{m}"


# ------------------------------------------------------------------ the report it reuses (jobs/bench/arms.py)

def reference(folder: Path) -> dict:
    """The report's N = 1 full MCAD of a seed: test EVAL, val rsum, pass and student seconds, store bytes."""
    from mcad.jobs.bench.arms import report_row

    return {"setting": REFERENCE, "n": 1, "m": 1, **report_row(folder)}


def train_views(demo, runs: dict[str, tuple[Path, Path, dict]], *, echo=print, tag: str) -> dict[str, dict]:
    """name -> (store, run, TeacherPassJob view fields): each pass in turn, then the full-MCAD students
    trained side by side (arms.train_arms); name -> the run's figures (no test)."""
    from mcad.jobs.bench.arms import train_arms

    return train_arms(demo, {name: (store, run, views, {}) for name, (store, run, views) in runs.items()},
                      echo=echo, tag=tag)


def _views(n: int, m: int, scale: tuple[float, float], cfg: ViewsBenchConfig, seed: int) -> dict:
    return {"views": n, "single_views": m, "crop_scale": tuple(scale), "crop_ratio": cfg.crop_ratio, "seed": seed}


def select_range(cfg: ViewsBenchConfig, demo, *, echo=print) -> dict:
    """Phase 2 on seed 0's val split: each candidate range's run (kept ones reused), and the chosen range."""
    from mcad.storage.atomic import atomic_write_json

    folder = Path(cfg.out) / SELECT_DIR
    candidates, todo, kept = {}, {}, []
    for scale in cfg.scale_list():
        name, where = _scale_name(scale), folder / f"scale_{_scale_name(scale)}"
        if (where / RESULT_NAME).is_file():
            candidates[name] = json.loads((where / RESULT_NAME).read_text())
            kept.append(name)
            echo(f"[views select] crop scale {name}: finished before, kept")
        else:
            todo[name] = (where / "store", where / "runs" / "mcad", _views(*SELECT_SETTING, scale, cfg, demo.seed))
    trained = train_views(demo, todo, echo=echo, tag="views select") if todo else {}
    for name, run in trained.items():
        scale = parse_scales(name)[0]
        candidates[name] = {**run, "crop_scale": list(scale), "setting": setting_name(*SELECT_SETTING)}
        atomic_write_json(folder / f"scale_{name}" / RESULT_NAME, candidates[name])
    order = [_scale_name(s) for s in cfg.scale_list()]
    chosen = max(order, key=lambda k: (candidates[k]["val_rsum"], -order.index(k)))  # the first on a tie
    echo(f"[views select] chosen crop scale {chosen} (val rsum "
         + ", ".join(f"{k}: {candidates[k]['val_rsum']:.2f}" for k in order) + ")")
    return {"seed": demo.seed, "split": "val", "setting": setting_name(*SELECT_SETTING),
            "rule": "the higher val rsum at the last epoch; the first range given on a tie",
            "candidates": {k: candidates[k] for k in order}, "chosen": chosen, "kept": kept}


def run_seed(cfg: ViewsBenchConfig, demo, selection: dict, *, echo=print) -> tuple[dict, list[str]]:
    """Phase 3 for one seed: setting name -> its result (kept, adopted from the selection, or run now),
    one arm per setting (arms.run_arms)."""
    from mcad.jobs.bench.arms import Arm, result_path, run_arms

    seed, folder = demo.seed, Path(cfg.out) / f"seed_{demo.seed}"
    scale = parse_scales(selection["chosen"])[0]
    arms, adopted = [], {}
    for n, m in cfg.setting_list():
        name = setting_name(n, m)
        path = result_path(folder, name)
        if path.is_file():
            kept = json.loads(path.read_text())
            if kept["crop_scale"] != list(scale):  # the selection was run again and chose another
                raise InputError(f"{path} was made at crop scale {_scale_name(kept['crop_scale'])}, "
                                 f"the selection now chose {selection['chosen']}; use another --out")
        elif seed == selection["seed"] and (n, m) == SELECT_SETTING:  # the same pass and student
            adopted[name] = selection["candidates"][selection["chosen"]]
        arms.append(Arm(name, passes=_views(n, m, scale, cfg, seed), store=f"store_{name}",
                        fields={"setting": name, "n": n, "m": m, "crop_scale": list(scale),
                                "crop_ratio": list(cfg.crop_ratio), "view_seed": seed,
                                "from_selection": name in adopted}))
    return run_arms(demo, arms, folder, adopted=adopted, echo=echo, tag=f"views seed {seed}")


# ------------------------------------------------------------------ the whole bench

def pinned(cfg: ViewsBenchConfig, demo0) -> dict:
    """What views_config.json pins: the report (its path and pinned settings), the ranges, the student."""
    from mcad.jobs.bench.arms import report_pins

    return {**report_pins(Path(cfg.report), demo0, "views"), "crop_scales": cfg.crop_scales,
            "crop_ratio": list(cfg.crop_ratio), "select_setting": setting_name(*SELECT_SETTING)}


def run_views_bench(cfg: ViewsBenchConfig, *, echo=print) -> dict:
    """The three phases and the tables into cfg.out; returns views.json's dict."""
    from mcad.jobs.bench.arms import check_config, open_report, write_outputs
    from mcad.jobs.bench.machine import machine_info
    from mcad.jobs.bench.views_tables import caption_truth, compare, markdown, teacher_on_crops
    from mcad.jobs.demo import shipped_teachers
    from mcad.storage.atomic import atomic_write_json

    demos = open_report(Path(cfg.report), cfg.seeds, cfg.ray_address, "views")
    seeds = list(demos)
    out = Path(cfg.out)
    pins = pinned(cfg, demos[0])
    check_config(out / CONFIG_NAME, pins, PINNED, "views")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, {**pins, "settings": cfg.settings, "seeds": cfg.seeds,
                                          "ray_address": cfg.ray_address})
    t0 = time.perf_counter()
    most = max(n for n, _ in cfg.setting_list() + [SELECT_SETTING])
    truth = caption_truth(Path(cfg.report) / "seed_0" / "data", cfg.scale_list(), cfg.crop_ratio, views=most)
    crops = teacher_on_crops(Path(cfg.report) / "seed_0" / "data", shipped_teachers(demos[0])[0], cfg.scale_list(),
                             cfg.crop_ratio, out / SELECT_DIR)
    selection = select_range(cfg, demos[0], echo=echo)
    per_seed, kept = {}, {}
    for s in seeds:
        per_seed[s], kept[s] = run_seed(cfg, demos[s], selection, echo=echo)
    refs = {s: reference(Path(cfg.report) / f"seed_{s}") for s in seeds}
    result = {"command": cfg.command(), "config": dataclasses.asdict(cfg), "pinned": pins, "seeds": seeds,
              "caption_truth": truth, "teacher_on_crops": crops, "selection": selection, "reference": REFERENCE,
              **compare(Path(cfg.report), out, seeds, per_seed, refs),
              "per_seed": {str(s): {REFERENCE: refs[s], **per_seed[s]} for s in seeds},
              "kept": {str(s): kept[s] for s in seeds}, "machine": machine_info(),
              "seconds": round(time.perf_counter() - t0, 2)}
    return write_outputs(out, "views", result, markdown, echo=echo, tag="views")
