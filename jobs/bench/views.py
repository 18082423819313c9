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
   evaluated once on test (OUT/seed_N/ranks/NxM.npz). Seed 0's 4x1 is the
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

from mcad.jobs.bench.report_methods import STUDENTS
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
        seeds = str(self.seeds).strip().lower()
        if seeds != "all" and not (seeds.isdigit() and int(seeds) >= 1):
            raise InputError(f"seeds must be 'all' or a positive number, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
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


# ------------------------------------------------------------------ the report it reuses

def report_seeds(cfg: ViewsBenchConfig) -> list[int]:
    """The report's seeds this run covers; refused when the report is not one, or one is not finished."""
    report = Path(cfg.report)
    path = report / "report_config.json"
    if not path.is_file():
        raise InputError(f"{report}: not a report folder (no report_config.json; made by mcad bench report)")
    n = int(json.loads(path.read_text())["seeds"])
    if cfg.seeds != "all" and int(cfg.seeds) > n:
        raise InputError(f"--seeds {cfg.seeds}: the report in {report} has {n} seed(s)")
    seeds = list(range(n if cfg.seeds == "all" else int(cfg.seeds)))
    missing = [s for s in seeds if not _finished(report / f"seed_{s}")]
    if missing:
        raise InputError(f"{report}: seed(s) {', '.join(map(str, missing))} not finished (no results.json with "
                         f"the full-MCAD student, its ranks and its store); wait for the report or pass --seeds K")
    return seeds


def _finished(folder: Path) -> bool:
    from mcad.jobs.demo import RANKS_DIR

    results = folder / "results.json"
    return (results.is_file() and "mcad" in json.loads(results.read_text()).get("students", {})
            and (folder / RANKS_DIR / "mcad.npz").is_file() and (folder / "store" / "manifest.json").is_file()
            and (folder / "runs" / "mcad" / "train_config.json").is_file())


def seed_demo_config(cfg: ViewsBenchConfig, seed: int):
    """The report's DemoConfig of a seed (its demo_config.json), on this run's Ray cluster."""
    from mcad.jobs.demo import DemoConfig

    folder = Path(cfg.report) / f"seed_{seed}"
    saved = json.loads((folder / "demo_config.json").read_text())
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    return DemoConfig(**{**{k: v for k, v in saved.items() if k in names}, "out": str(folder), "report_to": (),
                         "ray_address": cfg.ray_address})


def mcad_job(demo, store: Path, run: Path):
    """The full-MCAD student of the report (STUDENTS["mcad"] on the seed's DemoConfig) from `store`."""
    from mcad.jobs.demo import _student_job

    return _student_job(demo, Path(demo.out) / "data", store, run, STUDENTS["mcad"])


def student_settings(demo) -> dict:
    """The full-MCAD student's settings this run trains with; refused unless they are the report's own
    (every setting its train_config.json records but `views`, which a one-view store ignores)."""
    run = Path(demo.out) / "runs" / "mcad"
    job = mcad_job(demo, Path(demo.out) / "store", run)
    ours = json.loads(json.dumps(dataclasses.asdict(job.train)))
    saved = json.loads((run / "train_config.json").read_text())
    theirs = {k: v for k, v in saved["train"].items() if k != "views"}
    differ = [f"{k}: {theirs[k]!r} here {ours.get(k, 'absent')!r}" for k in theirs if ours.get(k, ...) != theirs[k]]
    if saved.get("preset") != job.preset:
        differ.append(f"preset: {saved.get('preset')!r} here {job.preset!r}")
    if differ:
        raise InputError(f"{run}: the report's full-MCAD student was trained with other settings "
                         f"({'; '.join(differ)}); the views students would not be paired with it")
    return {"preset": job.preset, **{k: v for k, v in ours.items() if k != "seed"}}


def reference(folder: Path) -> dict:
    """The report's N = 1 full MCAD of a seed: test EVAL, val rsum, pass and student seconds, store bytes."""
    from mcad.jobs.train_student import last_epoch_record
    from mcad.storage.reader import open_store
    from mcad.storage.views import view_stats

    results = json.loads((folder / "results.json").read_text())
    return {"setting": REFERENCE, "n": 1, "m": 1, "store": str(folder / "store"),
            "pass_seconds": results["seconds"]["teacher_pass"],
            **student_seconds(results["seconds"]["students"], len(results["student_seconds"]),
                              results["student_seconds"]["mcad"]),
            "val_rsum": last_epoch_record(folder / "runs" / "mcad").get("val_rsum"),
            "bytes_per_sample": view_stats(open_store(folder / "store"))["bytes_per_sample"],
            "test": results["students"]["mcad"]}


# ------------------------------------------------------------------ passes and students

def train_views(demo, runs: dict[str, tuple[Path, Path, dict]], *, echo=print, tag: str) -> dict[str, dict]:
    """name -> (store, run, TeacherPassJob view fields): each pass in turn, then the students trained
    side by side, all in one Ray session; name -> the run's figures (no test)."""
    from mcad.jobs.demo import _teacher_pass, shipped_teachers, train_side_by_side
    from mcad.jobs.ray_cluster import ray_session
    from mcad.jobs.train_student import last_epoch_record

    dual, single, _ = shipped_teachers(demo)
    data, seconds = Path(demo.out) / "data", {}
    with ray_session(demo.ray_address):
        for name, (store, _, views) in runs.items():
            echo(f"[{tag}] teacher pass {name} ({views}) ...")
            t0 = time.perf_counter()
            _teacher_pass(demo, data, dual, single, store, **views)
            seconds[name] = round(time.perf_counter() - t0, 2)
        jobs = {name: mcad_job(demo, store, run) for name, (store, run, _) in runs.items()}
        t0 = time.perf_counter()
        trained = train_side_by_side(jobs, ray_address=demo.ray_address, echo=echo, tag=tag)
        stage = time.perf_counter() - t0
    return {name: {"store": str(store), "run": str(run), "model": trained[name][0], "pass_seconds": seconds[name],
                   **student_seconds(stage, len(jobs), trained[name][1]),
                   "val_rsum": last_epoch_record(run).get("val_rsum"), **store_figures(store, Path(demo.out) / "store")}
            for name, (store, run, _) in runs.items()}


def student_seconds(stage: float, students: int, own: float) -> dict:
    """A student's cost: the side-by-side stage's wall time over its students (the machine's seconds per
    student, the report's cost S: comparable however many shared the cores), and its own wall time."""
    return {"student_seconds": round(stage / students, 2), "student_wall_seconds": round(own, 2),
            "students_side_by_side": students}


def store_figures(store: Path, report_store: Path) -> dict:
    """Bytes per sample by table (as `mcad signals stats`), and whether view 0 is the report's N = 1 store
    (every signals file with the same sha256)."""
    from mcad.storage.manifest import SIGNALS_SHA256, Manifest
    from mcad.storage.reader import open_store
    from mcad.storage.views import view_stats

    ours, theirs = Manifest.load(store).shards, Manifest.load(report_store).shards
    same = ours.keys() == theirs.keys() and all(ours[k].get(SIGNALS_SHA256) == theirs[k].get(SIGNALS_SHA256)
                                                 for k in ours)
    return {**view_stats(open_store(store)), "view0_is_report_store": same}


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
    """Phase 3 for one seed: setting name -> its result (kept, adopted from the selection, or run now)."""
    from mcad.jobs.demo import RANKS_DIR, _eval, keep_ranks
    from mcad.storage.atomic import atomic_write_json

    seed, folder = demo.seed, Path(cfg.out) / f"seed_{demo.seed}"
    scale = parse_scales(selection["chosen"])[0]
    results, todo, adopted, kept = {}, {}, {}, []
    for n, m in cfg.setting_list():
        name = setting_name(n, m)
        path = folder / f"result_{name}.json"
        if path.is_file():
            results[name], kept = json.loads(path.read_text()), kept + [name]
            if results[name]["crop_scale"] != list(scale):  # the selection was run again and chose another
                raise InputError(f"{path} was made at crop scale {_scale_name(results[name]['crop_scale'])}, "
                                 f"the selection now chose {selection['chosen']}; use another --out")
            echo(f"[views seed {seed}] {name}: finished before, kept ({path})")
        elif seed == selection["seed"] and (n, m) == SELECT_SETTING:  # the same pass and student
            adopted[name] = selection["candidates"][selection["chosen"]]
        else:
            todo[name] = (folder / f"store_{name}", folder / "runs" / name, _views(n, m, scale, cfg, seed))
    trained = train_views(demo, todo, echo=echo, tag=f"views seed {seed}") if todo else {}
    for name, run in {**adopted, **trained}.items():
        n, m = parse_settings(name)[0]
        ev = _eval(Path(run["model"]), Path(demo.out) / "data" / "test")
        keep_ranks({name: ev}, folder / RANKS_DIR)
        results[name] = {**run, "seed": seed, "setting": name, "n": n, "m": m, "crop_scale": list(scale),
                         "crop_ratio": list(cfg.crop_ratio), "view_seed": seed, "from_selection": name in adopted,
                         "test": ev}
        atomic_write_json(folder / f"result_{name}.json", results[name])
    return {setting_name(n, m): results[setting_name(n, m)] for n, m in cfg.setting_list()}, kept


# ------------------------------------------------------------------ the whole bench

def pinned(cfg: ViewsBenchConfig, demo0) -> dict:
    """What views_config.json pins: the report (its path and pinned settings), the ranges, the student."""
    from mcad.jobs.bench.report import PINNED as REPORT_PINNED

    report = json.loads((Path(cfg.report) / "report_config.json").read_text())
    return {"report": str(Path(cfg.report).resolve()), "report_config": {k: report.get(k) for k in REPORT_PINNED},
            "crop_scales": cfg.crop_scales, "crop_ratio": list(cfg.crop_ratio),
            "select_setting": setting_name(*SELECT_SETTING), "student": student_settings(demo0)}


def check_config(out: Path, now: dict) -> None:
    """Refuse an OUT whose results were made with other pinned values."""
    path = out / CONFIG_NAME
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(now))
    diff = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in PINNED if before.get(k) != now[k]]
    if diff:
        raise InputError(f"{out} holds a views run made with other settings ({'; '.join(diff)}); "
                         f"use another --out or delete it")


def run_views_bench(cfg: ViewsBenchConfig, *, echo=print) -> dict:
    """The three phases and the tables into cfg.out; returns views.json's dict."""
    from mcad.jobs.bench.machine import machine_info
    from mcad.jobs.bench.views_tables import caption_truth, compare, markdown
    from mcad.jobs.demo import shipped_teachers
    from mcad.storage.atomic import atomic_write_json

    seeds = report_seeds(cfg)
    demos = {s: seed_demo_config(cfg, s) for s in seeds}
    for s in seeds:  # teachers missing, a seed they did not hold out, other student settings: before any work
        shipped_teachers(demos[s])
        student_settings(demos[s])
    out = Path(cfg.out)
    pins = pinned(cfg, demos[0])
    check_config(out, pins)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, {**pins, "settings": cfg.settings, "seeds": cfg.seeds,
                                          "ray_address": cfg.ray_address})
    t0 = time.perf_counter()
    most = max(n for n, _ in cfg.setting_list() + [SELECT_SETTING])
    truth = caption_truth(Path(cfg.report) / "seed_0" / "data", cfg.scale_list(), cfg.crop_ratio, views=most)
    selection = select_range(cfg, demos[0], echo=echo)
    per_seed, kept = {}, {}
    for s in seeds:
        per_seed[s], kept[s] = run_seed(cfg, demos[s], selection, echo=echo)
    refs = {s: reference(Path(cfg.report) / f"seed_{s}") for s in seeds}
    result = {"command": cfg.command(), "config": dataclasses.asdict(cfg), "pinned": pins, "seeds": seeds,
              "caption_truth": truth, "selection": selection, "reference": REFERENCE,
              **compare(Path(cfg.report), out, seeds, per_seed, refs),
              "per_seed": {str(s): {REFERENCE: refs[s], **per_seed[s]} for s in seeds},
              "kept": {str(s): kept[s] for s in seeds}, "machine": machine_info(),
              "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out / "views.json", result)
    result = json.loads((out / "views.json").read_text())  # as the file holds it
    (out / "views.md").write_text(markdown(result))
    echo(f"[views] {out / 'views.json'}, {out / 'views.md'} ({result['seconds']:.0f} s)")
    return result
