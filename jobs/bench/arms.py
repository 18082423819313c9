"""Arms over a finished `mcad bench report`: variants of its full-MCAD student, trained on its seeds.

An arm (`Arm`) is a name, TeacherPassJob field overrides (`passes`) and
TrainConfig overrides (`train`). On seed N of a finished report DIR, an arm's
student is the report's full-MCAD student: STUDENTS["mcad"] on the seed's
DemoConfig (DIR/seed_N/demo_config.json). It has the same data, seed,
initialisation and settings, and `student_settings` checks these against
DIR/seed_N/runs/mcad/train_config.json. The arm's `train` overrides are applied
on top. Its store is:

- with no `passes`: the report's own store DIR/seed_N/store. No pass runs, and
  the arm's pass seconds and bytes per sample are the report's;
- otherwise a new teacher pass over DIR/seed_N/data/train into
  OUT/seed_N/<arm.store>, with the report's teachers, pool size and top-K
  plus the arm's fields (jobs.demo._teacher_pass). The default folder name,
  store_<k=v,...>, comes from the fields, so arms with the same pass overrides
  share one pass. A store that a finished arm of the same seed used (its
  manifest still there) is not made again: its recorded pass seconds are reused.

Per seed (`run_arms`), the passes run one after another, then the arms'
students train side by side (jobs.demo.train_side_by_side; `train_arms`), all
in one Ray session. Each student is evaluated once on the seed's test split.
Its ranks go to OUT/seed_N/ranks/<arm>.npz (jobs.demo.keep_ranks) and its
result to OUT/seed_N/result_<arm>.json: store, run, model, pass seconds,
student seconds (`student_seconds`), final val rsum, bytes per sample
(`store_figures`), the arm's `fields` and the test EVAL. A (seed, arm) whose
result file exists is kept as it is, so a stopped run restarts there.

The report's own runs are read by `report_row`: a student's figures (or a
teacher evaluation's, "teacher_dual") in the same form. The statistics against
them (paired t-intervals over seeds, a paired bootstrap per seed) are in
jobs/bench/arms_tables.py. `report_pins` and `check_config` pin what a
folder's results depend on: the report, its settings and the student
settings. A folder made with others is refused.

Used by `mcad bench views` (jobs/bench/views.py: one arm per views setting)
and `mcad bench levers` (jobs/bench/levers.py: one arm per lever of issue #18).
Nothing heavy (torch, pyarrow, Ray) is imported at module level.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mcad.jobs.bench.report_methods import STUDENTS
from mcad.storage.errors import InputError

REFERENCE_STUDENT = "mcad"  # the report's student every arm varies
TEACHER_PREFIX = "teacher_"  # "teacher_dual": the report's evaluation of its dual teacher (ranks/teacher_dual.npz)


@dataclass(frozen=True)
class Arm:
    """A variant of the report's full-MCAD student: its store's pass fields and its TrainConfig overrides."""

    name: str
    passes: dict = field(default_factory=dict)  # TeacherPassJob field overrides; {}: the report's own store
    train: dict = field(default_factory=dict)   # TrainConfig overrides on the report's full-MCAD settings
    store: str = ""                             # its store's folder in OUT/seed_N; "": store_name(passes)
    fields: dict = field(default_factory=dict)  # written into each of its results as they are

    def store_path(self, folder: Path, report_seed: Path) -> Path:
        """Its store on a seed: the report's own (no pass fields), or folder/<store folder>."""
        if not self.passes:
            return report_seed / "store"
        return folder / (self.store or store_name(self.passes))


def store_name(passes: dict) -> str:
    """The store folder of some pass overrides: store_k=v,... (sorted), one per distinct set of overrides."""
    from mcad.jobs.sweep import trial_name

    return f"store_{trial_name(passes)}"


def result_path(folder: Path, name: str) -> Path:
    return folder / f"result_{name}.json"


# ------------------------------------------------------------------ the report

def parse_seeds(text) -> str:
    """"all" or a positive count K (the report's first K seeds), canonical."""
    seeds = str(text).strip().lower()
    if seeds != "all" and not (seeds.isdigit() and int(seeds) >= 1):
        raise InputError(f"seeds must be 'all' or a positive number, got {text!r}")
    return seeds


def report_seeds(report: Path, seeds: str, needs: tuple[str, ...] = (REFERENCE_STUDENT,)) -> list[int]:
    """The report's seeds a run covers ("all" or the first K). Refused when the folder is not a report, or
    one of these seeds is unfinished: results.json and test ranks for each of `needs` (students, or
    teacher_<role> evaluations), the store, and the full-MCAD run."""
    path = report / "report_config.json"
    if not path.is_file():
        raise InputError(f"{report}: not a report folder (no report_config.json; made by mcad bench report)")
    n = int(json.loads(path.read_text())["seeds"])
    if seeds != "all" and int(seeds) > n:
        raise InputError(f"--seeds {seeds}: the report in {report} has {n} seed(s)")
    chosen = list(range(n if seeds == "all" else int(seeds)))
    missing = [s for s in chosen if not _finished(report / f"seed_{s}", needs)]
    if missing:
        raise InputError(f"{report}: seed(s) {', '.join(map(str, missing))} not finished (no results.json with "
                         f"{', '.join(needs)}, their test ranks, the store and the full-MCAD run); wait for the "
                         f"report or pass --seeds K")
    return chosen


def open_report(report: Path, seeds: str, ray_address: str | None, what: str,
                needs: tuple[str, ...] = (REFERENCE_STUDENT,)) -> dict[int, object]:
    """seed -> the report's DemoConfig of that seed (report_seeds' seeds), once every seed is checked
    before any work: finished, its teachers there and holding it out, the student settings the report's."""
    from mcad.jobs.demo import shipped_teachers

    demos = {s: seed_demo_config(report, s, ray_address) for s in report_seeds(report, seeds, needs)}
    for demo in demos.values():
        shipped_teachers(demo)
        student_settings(demo, what)
    return demos


def write_outputs(out: Path, name: str, result: dict, markdown, *, echo=print, tag: str) -> dict:
    """OUT/<name>.json, then OUT/<name>.md rendered by `markdown` from the dict as the file holds it."""
    from mcad.storage.atomic import atomic_write_json

    atomic_write_json(out / f"{name}.json", result)
    result = json.loads((out / f"{name}.json").read_text())
    (out / f"{name}.md").write_text(markdown(result))
    echo(f"[{tag}] {out / f'{name}.json'}, {out / f'{name}.md'} ({result['seconds']:.0f} s)")
    return result


def _finished(folder: Path, needs: tuple[str, ...]) -> bool:
    from mcad.jobs.demo import RANKS_DIR

    results = folder / "results.json"
    if not results.is_file():
        return False
    found = json.loads(results.read_text())
    return (all(_report_eval(found, name) is not None and (folder / RANKS_DIR / f"{name}.npz").is_file()
                for name in needs)
            and (folder / "store" / "manifest.json").is_file()
            and (folder / "runs" / REFERENCE_STUDENT / "train_config.json").is_file())


def _report_eval(results: dict, name: str) -> dict | None:
    """The test EVAL of a report seed's student, or of a teacher ("teacher_dual")."""
    if name.startswith(TEACHER_PREFIX):
        return results.get("teachers", {}).get(name.removeprefix(TEACHER_PREFIX))
    return results.get("students", {}).get(name)


def seed_demo_config(report: Path, seed: int, ray_address: str | None):
    """The report's DemoConfig of a seed (its demo_config.json), on this run's Ray cluster."""
    from mcad.jobs.demo import DemoConfig

    folder = report / f"seed_{seed}"
    saved = json.loads((folder / "demo_config.json").read_text())
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    return DemoConfig(**{**{k: v for k, v in saved.items() if k in names}, "out": str(folder), "report_to": (),
                         "ray_address": ray_address})


def arm_job(demo, store: Path, run: Path, train: dict | None = None):
    """The report's full-MCAD student (STUDENTS["mcad"] on the seed's DemoConfig) from `store`, with
    `train`'s TrainConfig overrides."""
    from mcad.jobs.demo import _student_job

    return _student_job(demo, Path(demo.out) / "data", store, run, {**STUDENTS[REFERENCE_STUDENT], **(train or {})})


def student_settings(demo, what: str) -> dict:
    """The full-MCAD student's settings the arms start from; refused unless they are the report's own
    (every setting its train_config.json records but `views`, which a one-view store ignores)."""
    run = Path(demo.out) / "runs" / REFERENCE_STUDENT
    job = arm_job(demo, Path(demo.out) / "store", run)
    ours = json.loads(json.dumps(dataclasses.asdict(job.train)))
    saved = json.loads((run / "train_config.json").read_text())
    theirs = {k: v for k, v in saved["train"].items() if k != "views"}
    differ = [f"{k}: {theirs[k]!r} here {ours.get(k, 'absent')!r}" for k in theirs if ours.get(k, ...) != theirs[k]]
    if saved.get("preset") != job.preset:
        differ.append(f"preset: {saved.get('preset')!r} here {job.preset!r}")
    if differ:
        raise InputError(f"{run}: the report's full-MCAD student was trained with other settings "
                         f"({'; '.join(differ)}); the {what} students would not be paired with it")
    return {"preset": job.preset, **{k: v for k, v in ours.items() if k != "seed"}}


def report_row(folder: Path, name: str = REFERENCE_STUDENT) -> dict:
    """A report seed's run in an arm result's form. A student: its test EVAL, final val rsum, the report's
    pass seconds and store bytes, and its student seconds. A teacher evaluation ("teacher_dual"): the
    test EVAL only."""
    from mcad.jobs.train_student import last_epoch_record
    from mcad.storage.reader import open_store
    from mcad.storage.views import view_stats

    results = json.loads((folder / "results.json").read_text())
    if name.startswith(TEACHER_PREFIX):
        return {"test": _report_eval(results, name)}
    return {"store": str(folder / "store"), "pass_seconds": results["seconds"]["teacher_pass"],
            **student_seconds(results["seconds"]["students"], len(results["student_seconds"]),
                              results["student_seconds"][name]),
            "val_rsum": last_epoch_record(folder / "runs" / name).get("val_rsum"),
            "bytes_per_sample": view_stats(open_store(folder / "store"))["bytes_per_sample"],
            "test": results["students"][name]}


# ------------------------------------------------------------------ passes and students

def train_arms(demo, runs: dict[str, tuple[Path, Path, dict, dict]], *, done: dict[str, float] | None = None,
               echo=print, tag: str) -> dict[str, dict]:
    """name -> (store, run, pass fields, TrainConfig overrides). First the passes these stores need,
    one after another: one per store folder, none for the report's own store or a store in `done`
    (its path -> the seconds its pass took). Then the students, trained side by side, all in one Ray
    session. Returns name -> the run's figures (no test)."""
    from mcad.jobs.demo import _teacher_pass, shipped_teachers, train_side_by_side
    from mcad.jobs.ray_cluster import ray_session
    from mcad.jobs.train_student import last_epoch_record

    out = Path(demo.out)
    own = out / "store"
    seconds = {_key(own): json.loads((out / "results.json").read_text())["seconds"]["teacher_pass"],
               **{_key(k): v for k, v in (done or {}).items()}}
    passes: dict[str, tuple[Path, dict, list[str]]] = {}
    for name, (store, _, fields, _) in runs.items():
        if _key(store) not in seconds:
            if passes.setdefault(_key(store), (store, fields, []))[1] != fields:
                raise ValueError(f"{store}: runs ask for it with other pass fields")
            passes[_key(store)][2].append(name)
    dual, single, _ = shipped_teachers(demo)
    with ray_session(demo.ray_address):
        for key, (store, fields, names) in passes.items():
            echo(f"[{tag}] teacher pass {', '.join(names)} ({fields}) ...")
            t0 = time.perf_counter()
            _teacher_pass(demo, out / "data", dual, single, store, **fields)
            seconds[key] = round(time.perf_counter() - t0, 2)
        jobs = {name: arm_job(demo, store, run, train) for name, (store, run, _, train) in runs.items()}
        t0 = time.perf_counter()
        trained = train_side_by_side(jobs, ray_address=demo.ray_address, echo=echo, tag=tag)
        stage = time.perf_counter() - t0
    return {name: {"store": str(store), "run": str(run), "model": trained[name][0],
                   "pass_seconds": seconds[_key(store)],
                   **student_seconds(stage, len(jobs), trained[name][1]),
                   "val_rsum": last_epoch_record(run).get("val_rsum"), **store_figures(store, own)}
            for name, (store, run, _, _) in runs.items()}


def _key(store) -> str:
    """A store folder however its path is spelled (a kept result may come from a run given --out otherwise)."""
    return str(Path(store).resolve())


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


def run_arms(demo, arms: list[Arm], folder: Path, *, adopted: dict[str, dict] | None = None, echo=print,
             tag: str) -> tuple[dict[str, dict], list[str]]:
    """One seed's arms into `folder` (OUT/seed_N). Each arm's result is kept (its result file exists),
    adopted (`adopted`: name -> a run trained elsewhere, train_arms' form), or trained now. Every new one
    is evaluated once on the seed's test split, its ranks kept, and its result written. Returns
    name -> result, in the arms' order, and the names kept."""
    from mcad.jobs.demo import RANKS_DIR, _eval, keep_ranks
    from mcad.storage.atomic import atomic_write_json

    report_seed, adopted = Path(demo.out), adopted or {}
    results, kept, todo = {}, [], {}
    for arm in arms:
        path = result_path(folder, arm.name)
        if path.is_file():
            results[arm.name], kept = json.loads(path.read_text()), kept + [arm.name]
            echo(f"[{tag}] {arm.name}: finished before, kept ({path})")
        elif arm.name not in adopted:
            todo[arm.name] = (arm.store_path(folder, report_seed), folder / "runs" / arm.name, arm.passes, arm.train)
    done = {r["store"]: r["pass_seconds"] for r in results.values()  # stores a kept arm was trained from
            if (Path(r["store"]) / "manifest.json").is_file()}
    trained = train_arms(demo, todo, done=done, echo=echo, tag=tag) if todo else {}
    fields = {arm.name: arm.fields for arm in arms}
    for name, run in {**{k: v for k, v in adopted.items() if k not in results}, **trained}.items():
        ev = _eval(Path(run["model"]), report_seed / "data" / "test")
        keep_ranks({name: ev}, folder / RANKS_DIR)
        results[name] = {**run, "seed": demo.seed, **fields[name], "test": ev}
        atomic_write_json(result_path(folder, name), results[name])
    return {arm.name: results[arm.name] for arm in arms}, kept


# ------------------------------------------------------------------ what a folder's results depend on

def report_pins(report: Path, demo0, what: str) -> dict:
    """The report (its resolved path and the settings it pins) and the student settings (seed 0's)."""
    from mcad.jobs.bench.report import PINNED as REPORT_PINNED

    saved = json.loads((report / "report_config.json").read_text())
    return {"report": str(report.resolve()), "report_config": {k: saved.get(k) for k in REPORT_PINNED},
            "student": student_settings(demo0, what)}


def check_config(path: Path, now: dict, keys: tuple[str, ...], what: str) -> dict:
    """Refuse a folder whose config file `path` pins other values of `keys`; returns what it holds ({})."""
    if not path.is_file():
        return {}
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(now))
    diff = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in keys if before.get(k) != now[k]]
    if diff:
        raise InputError(f"{path.parent} holds a {what} run made with other settings ({'; '.join(diff)}); "
                         f"use another --out or delete it")
    return before
