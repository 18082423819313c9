"""`mcad bench report`: quality over seeds, speed ratios and cost, in one reproducible run.

For each seed N (0 .. --seeds - 1) the demo's own flow (jobs.demo.run_flow) runs
into OUT/seed_N: the shapes benchmark from seed N (val and test meanings held
out of train), the teachers, ONE teacher pass, the teachers' evaluation (dual,
single re-ranking the dual top-16, and their combination), then six students
from that one store, trained side by side (jobs.demo.train_side_by_side), each
evaluated once on the test split. Every setting was chosen on val beforehand
(`mcad bench select`, docs/results/val-sweep); each ablation changes one factor
of full MCAD:

  mcad         full MCAD                               the student defaults (alpha, beta, ...)
  no_feat      no feature loss                         w_feat = 0
  beta0        no ITM logits in the distributions      beta = 0
  alpha0       no fused features in the targets        alpha = 0
  dual_kd      dual-teacher KD                         alpha = beta = 0
  baseline     contrastive only                        w_dist = w_feat = 0

Each student is compared with its own seed's baseline and dual-only KD: the
paired difference with a 95 % interval over seeds (t), and per seed a paired
bootstrap interval over test queries (student.metrics.paired_bootstrap). The
methods (STUDENTS, their labels) are jobs/bench/report_methods.py, these
statistics jobs/bench/report_stats.py, the tables and plots
jobs/bench/report_render.py; this module runs the seeds and the speed benches,
computes the cost and writes the report.

A seed whose OUT/seed_N/results.json exists is not run again (an interrupted
report restarts where it stopped); OUT/report_config.json pins the settings, and
a report folder made with other settings is refused. Then, unless
--skip-speed, the speed benches run in this process, with the same functions
and configurations as `mcad bench student|teacher-pass|store|presets` (the
exact command lines are written beside them), each kept as
OUT/speed/bench-<name>.json (also reused on a restart).

Outputs: OUT/report.json, OUT/report.md (tables), OUT/recall.png (R@1 and rsum
per method, mean with the seed spread), OUT/curves_<method>.png (training loss
per step and validation rsum per epoch, one line per seed).

    mcad bench report --out report/            5 seeds
    mcad bench report --out /tmp/r --quick --seeds 2 --skip-speed

This module imports nothing heavy (torch, pyarrow, Ray) at module level, so `mcad bench` reads its config's defaults at once
(its click command is in jobs/cli/bench.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from mcad.jobs.bench.report_methods import LABELS, METHODS, STUDENTS
from mcad.jobs.bench.report_stats import (
    ablation, bootstrap_differences, mean_std, method_evals, paired_differences, summarize,
)
from mcad.pipeline.shapes import DEMO_TEACHERS

CONFIG_NAME, RESULTS_NAME = "report_config.json", "results.json"
# Settings that change a seed's results: a report folder made with others is refused.
PINNED = ("quick", "epochs", "preset", "teachers", "train", "val", "test", "pool", "topk")

PAYBACK_FORMULA = (
    "A student run from the store costs S seconds of the machine (the students, trained side by side, "
    "take the students stage's wall time together: S is that time over their number, mean over seeds). With the "
    "teachers online every step also runs the teachers: `mcad bench student` measures that step at "
    "r = online_over_stored times the stored step, so an online run costs about r * S (the whole run "
    "scaled by the step ratio; validation and export, which do not change, are a small part). The "
    "stored path pays the teacher pass T once; n student runs cost T + n * S stored against "
    "n * r * S online, so the pass is paid back once n * (r - 1) * S >= T: "
    "break-even n = T / ((r - 1) * S), payback = ceil of it (never when r <= 1).")


@dataclass(frozen=True)
class ReportConfig:
    out: str = "report_out"
    seeds: int = 5
    quick: bool = False
    epochs: int | None = None     # None: the demo's (10, or 2 with --quick)
    preset: str = "s"
    teachers: str = str(DEMO_TEACHERS)   # a folder with dual/, single/ and teacher_recall.json
    skip_speed: bool = False
    ray_address: str | None = None  # where the passes and students run; None: a local cluster
    report_to: tuple[str, ...] = ()  # ("tensorboard",): every student run writes its tensorboard/
    # Benchmark sizes; None: the demo's (or its quick ones). Python only (tests shrink them).
    train: int | None = None
    val: int | None = None
    test: int | None = None
    pool: int | None = None
    topk: int | None = None

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if self.seeds < 1:
            raise InputError(f"seeds must be at least 1, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"epochs must be at least 1, got {self.epochs}")

    def pinned(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k in PINNED}

    def demo_config(self, seed: int):
        from mcad.jobs.demo import DemoConfig

        sizes = {k: getattr(self, k) for k in ("epochs", "train", "val", "test", "pool", "topk")
                 if getattr(self, k) is not None}
        return DemoConfig.make(quick=self.quick, out=str(Path(self.out) / f"seed_{seed}"), seed=seed,
                               teachers=self.teachers, preset=self.preset, ray_address=self.ray_address,
                               report_to=tuple(self.report_to), **sizes)


# ------------------------------------------------------------------ quality

def run_seeds(cfg: ReportConfig, *, echo=print) -> tuple[dict[int, dict], list[int]]:
    """Each seed's results (the demo's results.json), running the seeds not finished yet."""
    from mcad.jobs.demo import run_flow

    results, skipped = {}, []
    for seed in range(cfg.seeds):
        done = Path(cfg.out) / f"seed_{seed}" / RESULTS_NAME
        if done.exists():
            found = json.loads(done.read_text())
            if set(found.get("students", {})) == set(STUDENTS):
                echo(f"[report] seed {seed}: finished before, kept ({done})")
                results[seed], skipped = found, skipped + [seed]
                continue
        results[seed] = run_flow(cfg.demo_config(seed), students=STUDENTS, echo=echo,
                                 tag=f"report seed {seed}")
    return results, skipped


# ------------------------------------------------------------------ speed and cost

def speed_benches(cfg: ReportConfig) -> dict:
    """name -> (function, config, the equivalent command line); quick: small sizes."""
    from mcad.jobs.bench.presets import PresetsBenchConfig, run_presets_bench
    from mcad.jobs.bench.store import StoreBenchConfig, run_store_bench
    from mcad.jobs.bench.student import StudentBenchConfig, run_student_bench
    from mcad.jobs.bench.teacher_pass import TeacherPassBenchConfig, run_teacher_pass_bench

    teachers = "" if Path(cfg.teachers) == DEMO_TEACHERS else f" --teachers {cfg.teachers}"
    if cfg.quick:
        return {
            "student": (run_student_bench, StudentBenchConfig(preset=cfg.preset, steps=5, size="smoke"),
                        f"mcad bench student --preset {cfg.preset} --steps 5 --size smoke"),
            "teacher-pass": (run_teacher_pass_bench,
                             TeacherPassBenchConfig(size="smoke", samples=128, shards=4, pool_size=16, topk=4),
                             "mcad bench teacher-pass --size smoke --samples 128 --shards 4 --pool 16 --topk 4"),
            "store": (run_store_bench, StoreBenchConfig(rows=2000, shards=2),
                      "mcad bench store --rows 2000 --shards 2"),
            "presets": (run_presets_bench, PresetsBenchConfig(teachers=cfg.teachers, batches=2, queries=10),
                        f"mcad bench presets{teachers} --batches 2 --queries 10"),
        }
    return {
        "student": (run_student_bench, StudentBenchConfig(preset=cfg.preset),
                    f"mcad bench student --preset {cfg.preset}"),
        "teacher-pass": (run_teacher_pass_bench, TeacherPassBenchConfig(), "mcad bench teacher-pass"),
        "store": (run_store_bench, StoreBenchConfig(), "mcad bench store"),
        "presets": (run_presets_bench, PresetsBenchConfig(teachers=cfg.teachers), f"mcad bench presets{teachers}"),
    }


def run_speed(cfg: ReportConfig, *, echo=print) -> dict:
    """name -> that bench's JSON dict (plus "command"); a bench kept from an earlier run is reused."""
    from mcad.storage.atomic import atomic_write_json

    folder = Path(cfg.out) / "speed"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (fn, bench_cfg, command) in speed_benches(cfg).items():
        path = folder / f"bench-{name}.json"
        if path.exists():
            echo(f"[report] bench {name}: kept from an earlier run ({path})")
            out[name] = {**json.loads(path.read_text()), "kept": True}
            continue
        echo(f"[report] bench {name} ({command}) ...")
        result = {**fn(bench_cfg), "command": command}
        atomic_write_json(path, result)
        out[name] = json.loads(json.dumps(result))  # as the file holds it
    return out


def cost(per_seed: dict[int, dict], online_over_stored: float | None) -> dict:
    """Teacher-pass seconds, seconds per student run, and the runs that pay back one pass."""
    seeds = sorted(per_seed)
    passes = [per_seed[s]["seconds"]["teacher_pass"] for s in seeds]
    # Each student's own wall time, while it shared the cores with the others.
    by_method = {m: mean_std([per_seed[s]["student_seconds"][m] for s in seeds]) for m in STUDENTS}
    T = statistics.fmean(passes)
    S = statistics.fmean(per_seed[s]["seconds"]["students"] / len(per_seed[s]["student_seconds"]) for s in seeds)
    out = {"teacher_pass_s": T, "teacher_pass_s_per_seed": passes, "student_s": S,
           "student_s_by_method": by_method,
           "student_s_all_methods": statistics.fmean(v["mean"] for v in by_method.values()),
           "teacher_eval_s": statistics.fmean(per_seed[s]["seconds"]["eval_teachers"] for s in seeds),
           "online_over_stored": online_over_stored, "formula": PAYBACK_FORMULA}
    if online_over_stored is None:
        out.update(online_student_s=None, break_even_runs=None, payback_runs=None,
                   payback_note="speed benches skipped: no online_over_stored ratio")
    elif online_over_stored <= 1:
        out.update(online_student_s=online_over_stored * S, break_even_runs=None, payback_runs=None,
                   payback_note="online teachers cost no more than the store here: never paid back")
    else:
        n = T / ((online_over_stored - 1) * S)
        out.update(online_student_s=online_over_stored * S, break_even_runs=n, payback_runs=math.ceil(n))
    return out


# ------------------------------------------------------------------ the report

def check_config(cfg: ReportConfig) -> None:
    """Refuse an OUT folder whose finished seeds were made with other settings."""
    from mcad.jobs.bench.arms import check_config as check_pins

    check_pins(Path(cfg.out) / CONFIG_NAME, cfg.pinned(), PINNED, "report")


def run_report(cfg: ReportConfig, *, echo=print) -> dict:
    """Seeds, speed, cost, tables and plots into cfg.out; returns report.json's dict plus "skipped"."""
    from mcad.jobs.bench.machine import machine_info
    from mcad.jobs.demo import shipped_teachers
    from mcad.storage.atomic import atomic_write_json
    from mcad.student.models import get_preset
    from mcad.student.tensorboard import require

    get_preset(cfg.preset)
    require(cfg.report_to)  # a missing tensorboard package: one line, before any work
    for seed in range(cfg.seeds):  # no teachers, or a seed they did not hold out: fail before any work
        shipped_teachers(cfg.demo_config(seed))
    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, dataclasses.asdict(cfg))
    t0 = time.perf_counter()
    per_seed, skipped = run_seeds(cfg, echo=echo)
    speed = None if cfg.skip_speed else run_speed(cfg, echo=echo)
    evals = method_evals(per_seed)
    online = speed["student"]["ratios"]["online_over_stored"] if speed else None
    demo_cfg = json.loads((out / "seed_0" / "demo_config.json").read_text())
    mcad_run = out / "seed_0" / "runs" / "mcad" / "train_config.json"  # the full-MCAD student's settings
    report = {
        "config": dataclasses.asdict(cfg),
        "demo_config": demo_cfg,
        "mcad_train": json.loads(mcad_run.read_text())["train"] if mcad_run.is_file() else {},
        "seeds": sorted(per_seed),
        "methods": list(METHODS),
        "labels": LABELS,
        "students": STUDENTS,
        "per_seed": {str(s): {k: r[k] for k in ("teachers", "students", "seconds", "student_seconds")}
                     for s, r in sorted(per_seed.items())},
        "summary": summarize(evals),
        "ablation_vs_baseline": ablation(evals),
        "paired_differences": paired_differences({str(k): v for k, v in per_seed.items()}),
        "bootstrap": bootstrap_differences(out, sorted(per_seed)),
        "speed": ({name: {k: b[k] for k in ("bench", "ratios", "figures", "machine", "config", "command", "kept")
                          if k in b}
                   for name, b in speed.items()} if speed else None),
        "cost": cost(per_seed, online),
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds_total": round(sum(sum(r["seconds"].values()) for r in per_seed.values()), 2),
        "skipped_seeds": skipped,
    }
    atomic_write_json(out / "report.json", report)
    from mcad.jobs.bench.report_render import curves_plot, markdown, paired_plot, quality_text, recall_plot

    (out / "report.md").write_text(markdown(report))
    recall_plot(report, out / "recall.png")
    paired_plot(report, out / "paired.png")
    for method in STUDENTS:
        curves_plot(out, method, sorted(per_seed), out / f"curves_{method}.png")
    echo(quality_text(report))
    echo(f"[report] {out / 'report.json'}, {out / 'report.md'}, plots in {out} "
         f"({report['seconds']:.0f} s; seeds kept from before: {skipped or 'none'})")
    return {**report, "skipped": skipped}
