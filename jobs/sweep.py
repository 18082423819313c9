"""`mcad pipeline sweep`: many students from ONE signal store, on Ray Tune.

Every trial is a `train-student` run (jobs/train_student.py) with one point of
the grid, reading the same store: no teacher runs again. Trials report their
validation rsum after every epoch; ASHA stops the hopeless ones early. The
result is a table sorted by rsum (printed, and SWEEP/results.csv) and the best
finished student exported as a Hugging Face CLIPModel directory (SWEEP/best).

    mcad pipeline sweep --store store/ --data data/train --val-data data/val \\
        --out sweeps/a --grid alpha=0,0.5,1 --grid beta=0,1 --grid preset=smoke,s

Layout of SWEEP: sweep_config.json, trials/<name>/ (one train-student run per
trial, named by its grid point), tune/ (Ray Tune's experiment state),
results.csv, best/. `--resume` runs only the trials not done: each trial's
outcome is recorded in trials/<name>/trial.json (JSON, never Tune's pickled
state), finished and early-stopped trials are skipped, and the others continue
from their last epoch checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mcad.storage.atomic import atomic_write, atomic_write_dir, atomic_write_json
from mcad.storage.errors import InputError, error_line

CONFIG_NAME, RESULTS_NAME, BEST_DIR, TRIALS_DIR, TUNE_DIR = (
    "sweep_config.json", "results.csv", "best", "trials", "tune")
METRIC = "val_rsum"


@dataclass(frozen=True)
class SweepJob:
    store: str
    data: str
    val_data: str
    out: str
    grid: dict = field(default_factory=dict)    # name -> list of values (TrainConfig fields, preset)
    epochs: int = 3
    parallel: int = 1                           # trials at once
    cpus_per_trial: float = 0.0                 # 0: the largest share that lets `parallel` trials fit the nodes
    grace_epochs: int = 1                       # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = 2                   # ASHA: keep the best 1/reduction_factor at each rung
    online_teachers: tuple[str, str] | None = None  # teachers in the loop (for the sweep bench)
    ray_address: str | None = None
    resume: bool = False
    stall_timeout_s: float = 600.0              # fail when trials wait this long and none runs
    report_to: tuple[str, ...] = ()             # ("tensorboard",): each trial's run writes its tensorboard/

    def __post_init__(self):
        if self.cpus_per_trial < 0 or self.stall_timeout_s <= 0:
            raise InputError(f"need cpus_per_trial >= 0 and stall_timeout_s > 0, got "
                             f"{self.cpus_per_trial}, {self.stall_timeout_s}")
        if self.epochs < 1 or self.parallel < 1 or self.grace_epochs < 1 or self.reduction_factor < 2:
            raise InputError(f"need epochs >= 1, parallel >= 1, grace_epochs >= 1 and reduction_factor >= 2, got "
                             f"{self.epochs}, {self.parallel}, {self.grace_epochs}, {self.reduction_factor}")
        if not self.grid:
            raise InputError("the grid needs at least one setting (NAME=V1,V2,...)")


def parse_grid(specs: list[str] | tuple[str, ...]) -> dict[str, list]:
    """["alpha=0,0.5", "preset=smoke,s"] -> {"alpha": [0.0, 0.5], "preset": ["smoke", "s"]}, typed
    as the TrainConfig field's default (int, float, or str for the settings that take words), each
    value checked by TrainConfig."""
    from mcad.student.models import PRESETS
    from mcad.student.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    fixed = ("epochs", "mode")  # the same for every trial
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise InputError(f"grid {spec!r}: expected NAME=V1,V2,...")
        if name in fixed:
            raise InputError(f"grid {name}: not a grid setting, it is the same for every trial")
        if name != "preset" and name not in defaults:
            raise InputError(f"grid {name}: unknown setting; choose from preset, "
                             f"{', '.join(n for n in defaults if n not in fixed)}")
        items = [v.strip() for v in values.split(",")]
        if name == "preset":
            unknown = [v for v in items if v not in PRESETS]
            if unknown:
                raise InputError(f"grid preset: unknown presets {unknown}; choose from {sorted(PRESETS)}")
            grid[name] = items
            continue
        # Typed as the field's default: a string setting (rank_by, itm_norm, views) keeps its words.
        default = defaults[name]
        kind = str if isinstance(default, str) else int if isinstance(default, int) or name == "k_prime" else float
        try:
            grid[name] = [kind(v) for v in items]
        except ValueError:
            raise InputError(f"grid {name}: values must be {kind.__name__}s, got {values!r}") from None
        for value in grid[name]:  # a value TrainConfig refuses (a word not among its choices) fails here, not in a trial
            try:
                TrainConfig(**{name: value})
            except InputError as exc:
                raise InputError(f"grid {name}={value}: {exc}") from None
    return grid


def trial_name(config: dict) -> str:
    """A trial's folder name: its grid point, e.g. 'alpha=0.5,beta=1.0,preset=s'."""
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


def student_job(sweep: SweepJob, config: dict, *, threads: int = 0):
    """The train-student job of one grid point (resumed when its run has a checkpoint)."""
    from mcad.jobs.train_student import StudentJob
    from mcad.student.config import TrainConfig

    run = Path(sweep.out) / TRIALS_DIR / trial_name(config)
    resume = (run / "checkpoints" / "last" / "state.json").is_file()
    if not resume:
        shutil.rmtree(run, ignore_errors=True)  # a trial that died before its first checkpoint
    train = TrainConfig(**{k: v for k, v in config.items() if k != "preset"}, epochs=sweep.epochs)
    return StudentJob(store=sweep.store, data=sweep.data, out=str(run), train=train,
                      preset=config.get("preset", "s"), val_data=sweep.val_data,
                      online_teachers=sweep.online_teachers, resume=resume, threads_per_worker=threads,
                      report_to=tuple(sweep.report_to), hparams=dict(config))


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid, in a stable order."""
    import itertools

    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def run_sweep(sweep: SweepJob, *, progress: bool = True) -> dict:
    """Run (or resume) the sweep; return {"table": rows sorted by rsum, "best": DIR or None, ...}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mcad.jobs.progress import RunProgress
    from mcad.jobs.ray_cluster import node_resources, ray_session, require_fit, share_that_fits
    from mcad.pipeline.store_data import check_data_matches
    from mcad.storage.reader import open_store
    from mcad.student.tensorboard import require

    require(sweep.report_to)  # a missing tensorboard package: one line, before any trial
    store = open_store(sweep.store)  # refuse a bad store or data before any trial starts
    store.verify_files()  # every file against its manifest sha256 (each trial's reader checks again)
    check_data_matches(store, sweep.data)
    out = Path(sweep.out).resolve()
    sweep = dataclasses.replace(sweep, out=str(out))
    _prepare(sweep, out)
    points = grid_points(sweep.grid)
    pending = [p for p in points if _status(sweep, p).get("status") not in DONE]
    if pending:
        with ray_session(sweep.ray_address):
            # A trial runs on one node: it may ask at most what the largest node has.
            nodes = node_resources()
            per_trial = sweep.cpus_per_trial or share_that_fits(nodes, "CPU", sweep.parallel) or 1.0
            require_fit({"CPU": per_trial}, "sweep trial", nodes=nodes)
            watchdog = _watchdog(sweep.stall_timeout_s)
            trainable = tune.with_resources(
                tune.with_parameters(_trial, sweep=sweep, threads=max(1, int(per_trial))), {"cpu": per_trial})
            scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=sweep.grace_epochs,
                                      reduction_factor=sweep.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space={"point": tune.grid_search(pending)},
                tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                            max_concurrent_trials=sweep.parallel),
                # A new Tune experiment per invocation: resuming is ours (trial.json files),
                # so no pickled Tune state is ever loaded back.
                run_config=tune.RunConfig(storage_path=str(out / TUNE_DIR), name=f"run-{_runs(out)}",
                                          verbose=0, callbacks=[watchdog],  # progress: RunProgress below
                                          stop=watchdog.stopper))
            # Each trial's progress on the driver, tailed from its run's metrics.jsonl (jobs/progress.py).
            runs = {trial_name(p): _trial_dir(sweep, p) for p in pending}
            with RunProgress(runs, steps=_trial_steps(sweep, store, pending), epochs=sweep.epochs, enabled=progress):
                results = tuner.fit()
            for result in results:
                started = result.config is not None and (result.metrics or result.error)
                if started or not watchdog.stalled:
                    _record(sweep, result)  # a trial that never started stays to run
            if watchdog.stalled:
                left = sum(1 for p in pending if not _status(sweep, p))
                raise InputError(f"sweep stalled: no trial could start within the stall timeout "
                                 f"({sweep.stall_timeout_s:g} s; each asks {per_trial:g} CPUs, other jobs may "
                                 f"hold them); {left} of {len(points)} trials not run, rerun with --resume")
    table = results_table(sweep, points)
    write_csv(table, out / RESULTS_NAME)
    best = _export_best(table, out / BEST_DIR)
    return {"sweep": str(out), "table": table, "best": best, "results": str(out / RESULTS_NAME),
            "trials_run": len(pending), "trials_skipped": len(points) - len(pending)}


def _trial(config: dict, *, sweep: SweepJob, threads: int) -> None:
    """One Tune trial: a train-student run that reports every epoch (ASHA may stop it between)."""
    from ray import tune

    from mcad.jobs.train_student import run_train_student

    def report(record: dict) -> None:
        tune.report({METRIC: float(record.get(METRIC, 0.0)), "epoch": int(record["epoch"]) + 1,
                     "seconds": float(record["seconds"]), "samples_per_s": float(record["samples_per_s"])})

    def report_early(record: dict) -> None:  # the last epoch is reported once the model is exported
        if int(record["epoch"]) + 1 < sweep.epochs:
            report(record)

    result = run_train_student(student_job(sweep, dict(config["point"]), threads=threads), progress=False,
                               on_epoch=report_early)
    report(result["record"])


def _trial_steps(sweep: SweepJob, store, points: list[dict]) -> dict[str, int]:
    """Each trial's total steps (a grid of pools_per_batch or batch_size changes them)."""
    from mcad.student.config import TrainConfig
    from mcad.student.data import steps_per_epoch

    return {trial_name(p): sweep.epochs * steps_per_epoch(
        store, TrainConfig(**{k: v for k, v in p.items() if k != "preset"}, epochs=sweep.epochs)) for p in points}


def _watchdog(timeout_s: float):
    """A Tune callback that ends the experiment when trials wait `timeout_s` seconds while none runs:
    Tune waits forever for a trial it cannot place. `.stalled` is then true."""
    import time

    from ray import tune
    from ray.tune.experiment import Trial

    class Watchdog(tune.Callback):
        def __init__(self):
            self.stalled, self.since = 0, time.monotonic()
            watchdog = self

            class Stop(tune.Stopper):
                def __call__(self, trial_id, result):
                    return False

                def stop_all(self):
                    return bool(watchdog.stalled)

            self.stopper = Stop()

        def on_step_begin(self, iteration, trials, **info):
            waiting = sum(t.status == Trial.PENDING for t in trials)
            if not waiting or any(t.status == Trial.RUNNING for t in trials):
                self.since = time.monotonic()
            elif time.monotonic() - self.since > timeout_s:
                self.stalled = waiting

    return Watchdog()


STATUS_NAME = "trial.json"
FINISHED, STOPPED, ERROR = "finished", "stopped early (ASHA)", "error"
DONE = (FINISHED, STOPPED)


def _trial_dir(sweep: SweepJob, point: dict) -> Path:
    return Path(sweep.out) / TRIALS_DIR / trial_name(point)


def _status(sweep: SweepJob, point: dict) -> dict:
    path = _trial_dir(sweep, point) / STATUS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(sweep: SweepJob, result) -> None:
    """Write what Tune says of a trial into its run folder (the sweep's own, JSON, record)."""
    point = result.config["point"]
    metrics = result.metrics or {}
    epochs = int(metrics.get("epoch", 0))
    status = ERROR if result.error else FINISHED if epochs >= sweep.epochs else STOPPED
    folder = _trial_dir(sweep, point)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / STATUS_NAME, {
        "status": status, "epochs": epochs, METRIC: metrics.get(METRIC),
        "error": error_line(result.error, first=True) if result.error else None})


def results_table(sweep: SweepJob, points: list[dict]) -> list[dict]:
    """One row per grid point: finished trials by validation rsum, best first, then the others (stopped
    early, errors, not run) by the rsum of their last epoch: its settings, epochs done, status."""
    rows = []
    for point in points:
        status = _status(sweep, point)
        model = _trial_dir(sweep, point) / "model"
        rsum = status.get(METRIC)
        rows.append({"trial": trial_name(point), **point, "epochs": status.get("epochs", 0),
                     METRIC: round(float(rsum), 2) if rsum is not None else "",
                     "status": status.get("status", "not run"),
                     "model": str(model) if status.get("status") == FINISHED else ""})
    # Finished trials first: a trial ASHA stopped reports an earlier epoch's rsum, not comparable with theirs.
    return sorted(rows, key=lambda r: (r["status"] == FINISHED, r[METRIC] != "", r[METRIC] or 0.0), reverse=True)


def _runs(out: Path) -> int:
    return len(list((out / TUNE_DIR).glob("run-*"))) if (out / TUNE_DIR).is_dir() else 0


def write_csv(table: list[dict], path: Path) -> None:
    if not table:
        return
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)

    atomic_write(path, write)


def format_table(table: list[dict]) -> str:
    if not table:
        return "(no trials)"
    cols = [c for c in table[0] if c not in ("trial", "model")]
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in cols) for r in table]
    return "\n".join(lines)


def _export_best(table: list[dict], dest: Path) -> str | None:
    """Copy the best finished trial's HF model directory to SWEEP/best."""
    best = next((r for r in table if r["model"]), None)
    if best is None:
        return None
    def fill(tmp: Path) -> None:
        shutil.copytree(best["model"], tmp, dirs_exist_ok=True)
        (tmp / "mcad_sweep.json").write_text(json.dumps({"trial": best["trial"], METRIC: best[METRIC]}, indent=2))

    return str(atomic_write_dir(dest, fill))


def _prepare(sweep: SweepJob, out: Path) -> None:
    """Fresh sweeps need an empty --out; --resume needs the same sweep there."""
    from mcad.storage import fs

    saved = out / CONFIG_NAME
    config = json.loads(json.dumps(dataclasses.asdict(sweep), default=str))
    if sweep.resume:
        if not saved.is_file():
            raise InputError(f"{out}: nothing to resume (no {CONFIG_NAME})")
        before = json.loads(saved.read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(SweepJob)}  # sweeps saved before a field
        changed = sorted(k for k in config if k not in ("resume", "stall_timeout_s", "report_to")
                         and before.get(k, defaults[k]) != config[k])
        if changed:
            raise InputError(f"cannot resume {out}: {', '.join(changed)} differ from the sweep there")
        return
    fs.require_empty(out, "pass --resume to continue that sweep or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, config)
