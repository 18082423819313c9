"""`mcad demo`: the whole flow on the embedded shapes benchmark, offline, on a CPU.

synth -> teachers (shipped, or bootstrapped with --retrain-teachers) -> teacher
pass (local Ray) -> three students from the one store (contrastive baseline,
dual-only KD, MCAD), trained side by side as Ray tasks -> recall table, bar
chart and OUT/results.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mcad.pipeline.shapes import DEMO_TEACHERS, DEMO_TEACHERS_SEEDS
from mcad.storage.atomic import atomic_write_json
from mcad.storage.errors import InputError

STUDENTS = {  # name -> the loss settings that define it
    "baseline": dict(w_dist=0.0, w_feat=0.0),
    "dual_kd": dict(alpha=0.0, beta=0.0),
    "mcad": dict(),
}


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    quick: bool = False
    seed: int = 0
    retrain_teachers: bool = False
    teachers: str = str(DEMO_TEACHERS)   # a folder with dual/, single/ and teacher_recall.json
    train: int = 10000
    val: int = 1000   # the benchmark's default splits (SynthConfig)
    test: int = 2000
    pool: int = 64
    topk: int = 16
    epochs: int | None = None     # None: the student default (TrainConfig: chosen on val, docs/results/val-sweep)
    preset: str = "s"
    alpha: float | None = None    # None: the student default
    beta: float | None = None     # None: the student default (the teachers' own beta is in teacher_recall.json)
    teacher_epochs: int = 10
    ray_address: str | None = None  # where the teacher pass and the students run; None: a local cluster
    report_to: tuple[str, ...] = ()  # ("tensorboard",): each student run writes its tensorboard/

    @classmethod
    def make(cls, *, quick: bool, **kw) -> "DemoConfig":
        if quick:  # the same flow at a size that runs in about a minute
            kw = {"train": 1024, "val": 100, "test": 100, "epochs": 2, "teacher_epochs": 1, **kw}
        return cls(quick=quick, **kw)

    def resolved(self) -> "DemoConfig":
        """The student settings left None filled with the student defaults (what demo_config.json records)."""
        from mcad.student.config import TrainConfig

        return dataclasses.replace(self, **{k: getattr(TrainConfig, k) for k in ("epochs", "alpha", "beta")
                                            if getattr(self, k) is None})


def run_demo(cfg: DemoConfig, *, echo=print) -> dict:
    from mcad.pipeline.evaluate import recall_table

    results = run_flow(cfg, echo=echo)
    out = Path(cfg.out)
    _bar_chart(results, out / "recall.png")
    echo(recall_table(_table_rows(results)))
    echo(f"[demo] results: {out / 'results.json'}, chart: {out / 'recall.png'} "
         f"({sum(results['seconds'].values()):.0f} s in all)")
    return results


def run_flow(cfg: DemoConfig, *, students: dict[str, dict] | None = None, echo=print,
             tag: str = "demo") -> dict:
    """The demo's stages into cfg.out: synth, teachers, teacher pass, teacher eval, then each
    student of `students` (name -> TrainConfig overrides; default STUDENTS) trained from the one
    store and evaluated. Writes OUT/demo_config.json and OUT/results.json; returns the results."""
    from mcad.jobs.ray_cluster import ray_session

    students = STUDENTS if students is None else students
    cfg = cfg.resolved()
    if not cfg.retrain_teachers:
        shipped_teachers(cfg)  # fail before any work when they are missing
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo_config.json", dataclasses.asdict(cfg))
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        echo(f"[{tag}] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)
        return result

    data = stage("synth", lambda: _synth(cfg, out / "data"))
    dual, single, beta = stage("teachers", lambda: _teachers(cfg, data, out / "teachers"))
    atomic_write_json(out / "demo_config.json", {**dataclasses.asdict(cfg), "teacher_beta": beta})
    with ray_session(cfg.ray_address):  # one cluster for the pass and the students
        store = stage("teacher_pass", lambda: _teacher_pass(cfg, data, dual, single, out / "store"))
        teachers = stage("eval_teachers", lambda: _eval_teachers(data, dual, single, beta))
        paths = {"dual": str(dual), "single": str(single), "store": str(store)}
        jobs = {name: _student_job(cfg, data, store, out / "runs" / name, losses)
                for name, losses in students.items()}
        trained = stage("students", lambda: train_side_by_side(jobs, ray_address=cfg.ray_address,
                                                               echo=echo, tag=tag))
    evals = {}
    for name, (model, _) in trained.items():
        evals[name] = stage(f"eval_{name}", lambda: _eval(Path(model), data / "test"))
        paths[name] = model
    keep_ranks(teachers, out / RANKS_DIR, prefix="teacher_")
    keep_ranks(evals, out / RANKS_DIR)
    results = {"teachers": teachers, "students": evals, "seconds": seconds,
               "student_seconds": {name: round(s, 2) for name, (_, s) in trained.items()}, "paths": paths}
    atomic_write_json(out / "results.json", results)
    return results


RANKS_DIR = "ranks"  # OUT/ranks/<method>.npz: each test query's rank (report: paired bootstrap)


def keep_ranks(evals: dict[str, dict], folder: Path, prefix: str = "") -> None:
    """Move each EVAL's "ranks" (numpy arrays) into folder/<prefix><name>.npz; the EVALs stay JSON."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for name, ev in evals.items():
        ranks = ev.pop("ranks", None)
        if ranks is not None:
            np.savez_compressed(folder / f"{prefix}{name}.npz", **ranks)


def load_ranks(folder: Path, method: str) -> dict:
    """The ranks keep_ranks saved for a method ("teacher_dual", "mcad", ...)."""
    import numpy as np

    with np.load(folder / RANKS_DIR / f"{method}.npz") as f:
        return {k: f[k] for k in f.files}


def _synth(cfg: DemoConfig, folder: Path) -> Path:
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark

    synth = SynthConfig(train=cfg.train, val=cfg.val, test=cfg.test, seed=cfg.seed)
    config_file = folder / "synth_config.json"
    if config_file.exists() and json.loads(config_file.read_text()).get("config") == dataclasses.asdict(synth):
        return folder  # same seed and sizes: the shards already there are byte-identical
    write_benchmark(synth, folder, overwrite=True)
    return folder


def _teachers(cfg: DemoConfig, data: Path, folder: Path) -> tuple[Path, Path, float]:
    if not cfg.retrain_teachers:
        return shipped_teachers(cfg)
    from mcad.pipeline.shapes.bootstrap import BootstrapConfig, bootstrap
    from mcad.pipeline.shapes.bootstrap_data import load_split

    splits = {name: load_split(str(data / name)) for name in ("train", "val", "test")}
    result = bootstrap(BootstrapConfig(size="demo", epochs=cfg.teacher_epochs, seed=cfg.seed),
                       splits["train"], folder, val=splits["val"], test=splits["test"])
    return Path(result["dual"]), Path(result["single"]), float(result["recall"]["beta"])


def shipped_teachers(cfg: DemoConfig) -> tuple[Path, Path, float]:
    shipped = Path(cfg.teachers)
    dual, single = shipped / "dual", shipped / "single"
    if not (dual.is_dir() and single.is_dir()):
        raise InputError(f"no demo teachers in {shipped} (dual/ and single/); run with --retrain-teachers")
    if shipped == DEMO_TEACHERS and not 0 <= cfg.seed < DEMO_TEACHERS_SEEDS:
        raise InputError(f"seed {cfg.seed}: the shipped demo teachers hold out the val and test meanings of seeds "
                         f"0-{DEMO_TEACHERS_SEEDS - 1} only, so seed {cfg.seed}'s test could hold scenes they "
                         f"trained on; use a seed below {DEMO_TEACHERS_SEEDS} or --retrain-teachers")
    from mcad.pipeline.evaluate import combined_beta

    return dual, single, combined_beta(single)


def _teacher_pass(cfg: DemoConfig, data: Path, dual: Path, single: Path, store: Path, **fields) -> Path:
    """The demo's pass over data/train into store; `fields`: other TeacherPassJob fields (the arms of
    jobs/bench/arms.py: view fields for `mcad bench views`, pools for `mcad bench levers`), none: the
    demo's own pass (one view, consecutive pools)."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    job = TeacherPassJob(data=str(data / "train"), dual=str(dual), single=str(single), out=str(store),
                         pool_size=cfg.pool, topk=cfg.topk, mode="overwrite", ray_address=cfg.ray_address, **fields)
    run_teacher_pass(job)
    return store


def _eval_teachers(data: Path, dual: Path, single: Path, beta: float) -> dict:
    from mcad.pipeline.evaluate import evaluate

    return evaluate(dual, str(data / "test"), single=single, beta=beta, keep_ranks=True)


def _student_job(cfg: DemoConfig, data: Path, store: Path, run: Path, losses: dict):
    from mcad.jobs.train_student import StudentJob
    from mcad.student.config import TrainConfig

    train = TrainConfig(**{"alpha": cfg.alpha, "beta": cfg.beta, "epochs": cfg.epochs,
                           "seed": cfg.seed, **losses})
    return StudentJob(store=str(store), data=str(data / "train"), out=str(run), train=train,
                      preset=cfg.preset, val_data=str(data / "val"), report_to=tuple(cfg.report_to),
                      hparams={"student": run.name, "seed": cfg.seed, **losses} if cfg.report_to else None)


def train_side_by_side(jobs: dict, *, ray_address: str | None = None, echo=print,
                       tag: str = "demo") -> dict[str, tuple[str, float]]:
    """Train every student of `jobs` (name -> StudentJob, single-process) at once, one Ray
    task each; return name -> (model dir, that student's own wall seconds).

    Small students gain little from a second torch thread, so on a small machine
    they share the cores one thread each: two students on 2 cores train in about
    the time of one. A bar counts the epochs all students have finished.
    """
    import shutil

    import ray
    from tqdm import tqdm

    from mcad.jobs.ray_cluster import get_one_line, ray_session

    for job in jobs.values():
        shutil.rmtree(job.out, ignore_errors=True)
    with ray_session(ray_address) as cluster:
        cpus = float(cluster["resources"].get("CPU", 1.0))
        threads = max(1, int(cpus // len(jobs)))
        task = ray.remote(num_cpus=min(float(threads), cpus / len(jobs)))(_train_task)
        refs = {task.remote(job, threads): name for name, job in jobs.items()}
        total = sum(job.train.epochs for job in jobs.values())
        trained, pending = {}, list(refs)
        with tqdm(total=total, unit="epoch", desc=f"{len(jobs)} students") as bar:
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
                    for ref in done:
                        trained[refs[ref]] = get_one_line(ref, f"student {refs[ref]}")
                    bar.update(sum(_epochs_done(Path(job.out)) for job in jobs.values()) - bar.n)
            except BaseException:  # one student failed (or Ctrl-C): stop the others too
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
    for name in jobs:
        echo(f"[{tag}] student {name}: {trained[name][1]:.0f} s")
    return {name: trained[name] for name in jobs}


def _epochs_done(run: Path) -> int:
    """Epoch records in RUN/metrics.jsonl so far (a line being written is not one yet)."""
    from mcad.student.curves import METRICS_FILE

    path = run / METRICS_FILE
    if not path.is_file():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            done += json.loads(line).get("kind") == "epoch"
        except ValueError:
            pass
    return done


def _train_task(job, threads: int) -> tuple[str, float]:
    import time

    import torch

    from mcad.jobs.train_student import run_train_student

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = run_train_student(job, progress=False)["model"]
    return model, time.perf_counter() - t0


def _eval(model: Path, test: Path) -> dict:
    from mcad.pipeline.evaluate import evaluate

    return evaluate(model, str(test), keep_ranks=True)


def _table_rows(results: dict) -> dict[str, dict]:
    """The demo's EVAL dicts as recall-table rows: the teachers, then the students."""
    rows = {f"teacher {k}": v for k, v in results["teachers"].items()}
    rows.update({f"student {k}": v for k, v in results["students"].items()})
    return rows


def _bar_chart(results: dict, path: Path) -> None:
    """R@1 both ways per teacher (T) and student (S), each bar labelled with its value. The y axis
    starts just below the smallest bar (marked as broken on the axis), so a few points of difference
    are visible; the legend sits above the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"T:{k}", v) for k, v in results["teachers"].items()]
    rows += [(f"S:{k}", v) for k, v in results["students"].items()]
    names = [n for n, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    xs = range(len(rows))
    values = []
    for off, d, label in ((-width / 2, "i2t", "image→text R@1"), (width / 2, "t2i", "text→image R@1")):
        heights = [r[d]["R@1"] for _, r in rows]
        values += heights
        bars = ax.bar([x + off for x in xs], heights, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    low, high = min(values), max(values)
    bottom = max(0.0, 5.0 * ((low - max(2.0, 0.1 * (high - low))) // 5.0))  # a round value under the lowest bar
    ax.set_ylim(bottom, high + 0.12 * (high - bottom))
    if bottom > 0:  # the axis does not start at 0: the usual break marks on the y axis
        ax.plot([0, 0], [0.035, 0.06], transform=ax.transAxes, color="white", lw=3, clip_on=False)
        for y in (0.035, 0.06):
            ax.plot([-0.012, 0.012], [y - 0.012, y + 0.012], transform=ax.transAxes, color="black", lw=1,
                    clip_on=False)
        ax.set_ylabel(f"R@1 (%), axis from {bottom:g}")
    else:
        ax.set_ylabel("R@1 (%)")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_title("shapes test split: teachers (T) and students (S)", pad=24)
    ax.legend(fontsize=8, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
