"""`mcad bench report`: quality over seeds, speed ratios and cost, in one reproducible run.

For each seed N (0 .. --seeds - 1) the demo's own flow (jobs.demo.run_flow) runs
into OUT/seed_N: the shapes benchmark from seed N, the teachers, ONE teacher
pass, the teachers' evaluation (dual, single re-ranking the dual top-16, and
their combination), then five students from that one store, each evaluated on
the test split:

  baseline     contrastive only                        w_dist = w_feat = 0
  dual_kd      dual-teacher KD (distribution + features of the plain dual teacher)
                                                       alpha = beta = 0
  single_dist  the single teacher's re-ranked distribution only
                                                       alpha = 0, beta = the demo's, w_feat = 0
  feat_only    MCAD feature distillation only          w_dist = 0
  mcad         full MCAD                               the student defaults (alpha, beta)

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

    mcad bench report --out report/ --seeds 3
    mcad bench report --out /tmp/r --quick --seeds 2 --skip-speed

This module imports only click and the stdlib at module level.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import click

from jobs.bench_presets import ASSETS

STUDENTS = {  # name -> TrainConfig overrides on the demo's (alpha, beta from the demo config)
    "baseline": dict(w_dist=0.0, w_feat=0.0),
    "dual_kd": dict(alpha=0.0, beta=0.0),
    "single_dist": dict(alpha=0.0, w_feat=0.0),
    "feat_only": dict(w_dist=0.0),
    "mcad": dict(),
}
TEACHERS = ("dual", "single", "combined")
METHODS = tuple(f"teacher_{t}" for t in TEACHERS) + tuple(STUDENTS)
LABELS = {
    "teacher_dual": "teacher dual (CLIP)",
    "teacher_single": "teacher single (BLIP-ITM re-ranks dual top-16)",
    "teacher_combined": "teacher combined (dual + beta ITM)",
    "baseline": "student: contrastive only",
    "dual_kd": "student: dual-only KD (alpha = beta = 0)",
    "single_dist": "student: single re-ranked distribution only (alpha = 0, beta > 0, no feature loss)",
    "feat_only": "student: feature distillation only (no distribution loss)",
    "mcad": "student: full MCAD",
}
FIGURES = (("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"))
CONFIG_NAME, RESULTS_NAME = "report_config.json", "results.json"
# Settings that change a seed's results: a report folder made with others is refused.
PINNED = ("quick", "epochs", "preset", "teachers", "train", "val", "test", "pool", "topk")

PAYBACK_FORMULA = (
    "A student run from the store costs S seconds (the mean of the full-MCAD student runs). With the "
    "teachers online every step also runs the teachers: `mcad bench student` measures that step at "
    "r = online_over_stored times the stored step, so an online run costs about r * S (the whole run "
    "scaled by the step ratio; validation and export, which do not change, are a small part). The "
    "stored path pays the teacher pass T once; n student runs cost T + n * S stored against "
    "n * r * S online, so the pass is paid back once n * (r - 1) * S >= T: "
    "break-even n = T / ((r - 1) * S), payback = ceil of it (never when r <= 1).")


@dataclass(frozen=True)
class ReportConfig:
    out: str = "report_out"
    seeds: int = 3
    quick: bool = False
    epochs: int | None = None     # None: the demo's (6, or 2 with --quick)
    preset: str = "s"
    teachers: str = str(ASSETS)   # a folder with dual/, single/ and teacher_recall.json
    skip_speed: bool = False
    ray_address: str | None = None  # the teacher passes' cluster; None: a local one
    # Benchmark sizes; None: the demo's (or its quick ones). Python only (tests shrink them).
    train: int | None = None
    val: int | None = None
    test: int | None = None
    pool: int | None = None
    topk: int | None = None

    def __post_init__(self):
        from storage.errors import InputError

        if self.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")

    def pinned(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k in PINNED}

    def demo_config(self, seed: int):
        from jobs.demo import DemoConfig

        sizes = {k: getattr(self, k) for k in ("epochs", "train", "val", "test", "pool", "topk")
                 if getattr(self, k) is not None}
        return DemoConfig.make(quick=self.quick, out=str(Path(self.out) / f"seed_{seed}"), seed=seed,
                               teachers=self.teachers, preset=self.preset, ray_address=self.ray_address,
                               **sizes)


# ------------------------------------------------------------------ quality

def run_seeds(cfg: ReportConfig, *, echo=print) -> tuple[dict[int, dict], list[int]]:
    """Each seed's results (the demo's results.json), running the seeds not finished yet."""
    from jobs.demo import run_flow

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


def method_evals(per_seed: dict[int, dict]) -> dict[str, list[dict]]:
    """method -> its EVAL dict of every seed, in seed order."""
    out: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in sorted(per_seed):
        r = per_seed[seed]
        for t in TEACHERS:
            out[f"teacher_{t}"].append(r["teachers"][t])
        for s in STUDENTS:
            out[s].append(r["students"][s])
    return out


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(evals: dict[str, list[dict]]) -> dict:
    """Per method: mean and std over seeds of R@1/5/10 both directions and rsum."""
    summary = {}
    for method, runs in evals.items():
        s = {d: {k: mean_std([r[d][k] for r in runs]) for k in ("R@1", "R@5", "R@10")} for d in ("i2t", "t2i")}
        s["rsum"] = mean_std([r["rsum"] for r in runs])
        summary[method] = s
    return summary


def ablation(evals: dict[str, list[dict]]) -> dict:
    """Each student against the baseline of the same seed: mean and std of the per-seed differences."""
    base = evals["baseline"]
    out = {}
    for method in STUDENTS:
        if method == "baseline":
            continue
        runs = evals[method]
        out[method] = {
            "i2t_R@1": mean_std([r["i2t"]["R@1"] - b["i2t"]["R@1"] for r, b in zip(runs, base)]),
            "t2i_R@1": mean_std([r["t2i"]["R@1"] - b["t2i"]["R@1"] for r, b in zip(runs, base)]),
            "rsum": mean_std([r["rsum"] - b["rsum"] for r, b in zip(runs, base)]),
        }
    return out


# ------------------------------------------------------------------ speed and cost

def speed_benches(cfg: ReportConfig) -> dict:
    """name -> (function, config, the equivalent command line); quick: small sizes."""
    from jobs.bench_presets import PresetsBenchConfig, run_presets_bench
    from jobs.bench_store import StoreBenchConfig, run_store_bench
    from jobs.bench_student import StudentBenchConfig, run_student_bench
    from jobs.bench_teacher_pass import TeacherPassBenchConfig, run_teacher_pass_bench

    teachers = "" if Path(cfg.teachers) == ASSETS else f" --teachers {cfg.teachers}"
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
    from storage.atomic import atomic_write_json

    folder = Path(cfg.out) / "speed"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (fn, bench_cfg, command) in speed_benches(cfg).items():
        path = folder / f"bench-{name}.json"
        if path.exists():
            echo(f"[report] bench {name}: kept from an earlier run ({path})")
            out[name] = json.loads(path.read_text())
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
    by_method = {m: mean_std([per_seed[s]["seconds"][f"student_{m}"] for s in seeds]) for m in STUDENTS}
    T, S = statistics.fmean(passes), by_method["mcad"]["mean"]
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
    from storage.errors import InputError

    path = Path(cfg.out) / CONFIG_NAME
    if not path.exists():
        return
    before = {k: json.loads(path.read_text()).get(k) for k in PINNED}
    now = json.loads(json.dumps(cfg.pinned()))
    if before != now:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in PINNED if before[k] != now[k])
        raise InputError(f"{cfg.out} holds a report made with other settings ({diff}); "
                         f"use another --out or delete it")


def run_report(cfg: ReportConfig, *, echo=print) -> dict:
    """Seeds, speed, cost, tables and plots into cfg.out; returns report.json's dict plus "skipped"."""
    from jobs.bench_machine import machine_info
    from jobs.demo import shipped_teachers
    from storage.atomic import atomic_write_json
    from student.models import get_preset

    get_preset(cfg.preset)
    shipped_teachers(cfg.demo_config(0))  # no teachers: fail before any work
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
        "per_seed": {str(s): {"teachers": r["teachers"], "students": r["students"], "seconds": r["seconds"]}
                     for s, r in sorted(per_seed.items())},
        "summary": summarize(evals),
        "ablation_vs_baseline": ablation(evals),
        "speed": ({name: {k: b[k] for k in ("bench", "ratios", "figures", "machine", "config", "command") if k in b}
                   for name, b in speed.items()} if speed else None),
        "cost": cost(per_seed, online),
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds_total": round(sum(sum(r["seconds"].values()) for r in per_seed.values()), 2),
        "skipped_seeds": skipped,
    }
    atomic_write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    recall_plot(report, out / "recall.png")
    for method in STUDENTS:
        curves_plot(out, method, sorted(per_seed), out / f"curves_{method}.png")
    echo(quality_text(report))
    echo(f"[report] {out / 'report.json'}, {out / 'report.md'}, plots in {out} "
         f"({report['seconds']:.0f} s; seeds kept from before: {skipped or 'none'})")
    return {**report, "skipped": skipped}


# ------------------------------------------------------------------ tables

def _pm(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _md_table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def quality_rows(report: dict) -> list[list[str]]:
    rows = [["method", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"]]
    for m in report["methods"]:
        s = report["summary"][m]
        rows.append([report["labels"][m], *(_pm(s[d][k]) for d, k in FIGURES), _pm(s["rsum"])])
    return rows


def per_seed_rows(report: dict) -> list[list[str]]:
    rows = [["method", *(f"seed {s}" for s in report["seeds"])]]
    for m in report["methods"]:
        cells = []
        for s in report["seeds"]:
            block = report["per_seed"][str(s)]
            r = block["teachers"][m.removeprefix("teacher_")] if m.startswith("teacher_") else block["students"][m]
            cells.append(f"{r['i2t']['R@1']:.1f} / {r['t2i']['R@1']:.1f}")
        rows.append([m, *cells])
    return rows


def quality_text(report: dict) -> str:
    rows = quality_rows(report)
    rows = [[m if i else r[0]] + r[1:] for i, (r, m) in enumerate(zip(rows, ["method", *report["methods"]]))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def markdown(report: dict) -> str:
    from jobs.bench_presets import table_rows

    c, d, m = report["config"], report["demo_config"], report["machine"]
    n = len(report["seeds"])
    lines = [
        "# mcad report: shapes benchmark", "",
        f"Seeds {', '.join(map(str, report['seeds']))} ({n}); per seed: {d['train']:,} train / {d['val']:,} val / "
        f"{d['test']:,} test images, pools of {d['pool']}, {d['topk']} candidates; students: preset "
        f"`{d['preset']}`, {d['epochs']} epochs, alpha = {d['alpha']}, beta = {d['beta']}"
        + (f", distillation temperature {report['mcad_train']['kd_temperature']}"
           if "kd_temperature" in report.get("mcad_train", {}) else "") + "; one teacher pass "
        f"per seed, every student of a seed from that one store. Teachers: `{c['teachers']}`"
        + (" (the shipped demo teachers, bootstrapped on the seed-0 benchmark: see its README; the other "
           "seeds draw new data from the same generator)." if Path(c["teachers"]) == ASSETS else "."),
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), load average at the end {m['load_average'][0]:.2f}. "
        f"Seed stages {report['stage_seconds_total']:.0f} s in all; this invocation {report['seconds']:.0f} s "
        f"(seeds kept from an earlier run: {report['skipped_seeds'] or 'none'}).", "",
        "## Quality (test split, recall %, mean ± sample std over seeds)", "",
        *_md_table(quality_rows(report)), "",
        "R@1 of each seed (image→text / text→image); `mcad eval --model seed_N/runs/METHOD/model "
        "--data seed_N/data/test` prints a student's, `mcad eval --model TEACHERS/dual --single "
        "TEACHERS/single --beta BETA --data seed_N/data/test` the teachers'.", "",
        *_md_table(per_seed_rows(report)), "",
        "## Ablations against the contrastive baseline",
        "",
        "Differences to the baseline student of the same seed (same data, same store), mean ± std over seeds.",
        "",
    ]
    rows = [["student", "Δ i2t R@1", "Δ t2i R@1", "Δ rsum"]]
    for method, a in report["ablation_vs_baseline"].items():
        rows.append([report["labels"][method], _pm(a["i2t_R@1"]), _pm(a["t2i_R@1"]), _pm(a["rsum"])])
    lines += [*_md_table(rows), ""]
    lines += ["## Speed", ""]
    speed = report["speed"]
    if speed is None:
        lines += ["Skipped (`--skip-speed`).", ""]
    else:
        rows = [["bench", "ratio", "value", "command"]]
        for name in ("student", "teacher-pass", "store"):
            for ratio, value in speed[name]["ratios"].items():
                rows.append([name, f"`{ratio}`", f"{value:.3f}", f"`{speed[name]['command']}`"])
        f = speed["student"]["figures"]
        lines += [*_md_table(rows), "",
                  f"Student step (ms): {f['plain_ms_per_step']:.1f} contrastive, {f['mcad_stored_ms_per_step']:.1f} "
                  f"MCAD from the store, {f['mcad_online_ms_per_step']:.1f} MCAD with the teachers online "
                  f"(batch {f['batch_size']}). Store: {speed['store']['figures']['bytes_per_sample']:.0f} bytes "
                  f"per sample, reader {speed['store']['figures']['reader_rows_per_s']:,.0f} rows/s. "
                  f"Full JSON of each bench: `speed/bench-<name>.json`.", ""]
    co = report["cost"]
    lines += ["## Cost", "",
              *_md_table([["figure", "value"],
                          ["teacher pass (s, mean over seeds)", f"{co['teacher_pass_s']:.1f}"],
                          ["student run from the store, full MCAD (s, mean)", f"{co['student_s']:.1f}"],
                          ["student run, all five kinds (s, mean)", f"{co['student_s_all_methods']:.1f}"],
                          ["teacher evaluation (s, mean)", f"{co['teacher_eval_s']:.1f}"],
                          ["online_over_stored (bench student)", _num(co["online_over_stored"], 2)],
                          ["student run with teachers online (s, estimated)", _num(co["online_student_s"], 1)],
                          ["break-even student runs", _num(co["break_even_runs"], 2)],
                          ["student runs that pay back one teacher pass", _num(co["payback_runs"], 0)]]),
              "", co["formula"], ""]
    if co.get("payback_note"):
        lines += [co["payback_note"], ""]
    lines += ["## Student presets against the teachers", ""]
    if speed is None:
        lines += ["Skipped (`--skip-speed`).", ""]
    else:
        p = speed["presets"]
        lines += [*_md_table(table_rows(p)), "",
                  f"`{p['command']}`. Parameters: the exported CLIPModel (student heads dropped); FLOPs: torch's "
                  f"count, 2 per multiply-add, one image / one caption of the maximum length; images/s and "
                  f"captions/s: batches of {p['config']['batch']}, model forward only; latency: one text query "
                  f"(tokenize, encode, score against precomputed normalised gallery embeddings, top-10), median "
                  f"of {p['config']['queries']} queries. {p['figures']['single']['latency_note']}.", ""]
    lines += ["## Plots", "", "![recall](recall.png)", ""]
    lines += [f"![{s}](curves_{s}.png)" for s in report["students"]]
    return "\n".join(lines) + "\n"


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------ plots

def recall_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, s = report["methods"], report["summary"]
    xs = list(range(len(methods)))
    fig, (ax, ax_sum) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.4
    for off, d, label in ((-width / 2, "i2t", "image→text R@1"), (width / 2, "t2i", "text→image R@1")):
        ax.bar([x + off for x in xs], [s[m][d]["R@1"]["mean"] for m in methods], width,
               yerr=[s[m][d]["R@1"]["std"] for m in methods], capsize=3, label=label)
    ax_sum.bar(xs, [s[m]["rsum"]["mean"] for m in methods], 0.6, yerr=[s[m]["rsum"]["std"] for m in methods],
               capsize=3, color="tab:gray")
    names = [m.replace("teacher_", "T:") for m in methods]
    for a, title in ((ax, "R@1"), (ax_sum, "rsum")):
        a.set_xticks(xs, names, rotation=30, ha="right")
        a.set_title(f"{title}, mean ± std over {len(report['seeds'])} seed(s)")
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=8)
    low = min(s[m]["rsum"]["mean"] - s[m]["rsum"]["std"] for m in methods)
    ax_sum.set_ylim(max(0.0, low - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_plot(out: Path, method: str, seeds: list[int], path: Path) -> None:
    """Training loss per step and validation rsum per epoch of one student, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from student.curves import METRICS_FILE, read_metrics

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed in seeds:
        metrics = out / f"seed_{seed}" / "runs" / method / METRICS_FILE
        if not metrics.exists():
            continue
        records = read_metrics(metrics)
        steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "step" and "loss" in r]
        epochs = [(r["epoch"] + 1, r["val_rsum"]) for r in records if r.get("kind") == "epoch" and "val_rsum" in r]
        if steps:
            ax_loss.plot(*zip(*steps), lw=1, marker="." if len(steps) < 20 else None, label=f"seed {seed}")
        if epochs:
            ax_val.plot(*zip(*epochs), marker="o", label=f"seed {seed}")
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{method}: training loss")
    ax_val.set(xlabel="epoch", ylabel="rsum (%)", title=f"{method}: validation recall sum")
    for a in (ax_loss, ax_val):
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ CLI

EPILOG = """\b
Examples:
  mcad bench report --out report/                 3 seeds, demo sizes, speed benches (~40 min on 2 CPU cores)
  mcad bench report --out /tmp/r --quick --seeds 2 --skip-speed    the same flow, small (a few minutes)
  mcad bench report --out report/ --seeds 5       adds seeds 3 and 4 to a finished 3-seed report
"""


@click.command("report", epilog=EPILOG)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Report folder (seeds already finished in it are kept).")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0 .. N-1, one teacher pass each.")
@click.option("--quick", is_flag=True, help="The demo's quick sizes, and small speed benches.")
@click.option("--epochs", type=int, default=None, help="Student epochs (default: the demo's).")
@click.option("--preset", default="s", show_default=True, help="Student size preset.")
@click.option("--teachers", type=click.Path(exists=True, file_okay=False), default=str(ASSETS),
              show_default="the shipped demo teachers", help="A folder with dual/ and single/.")
@click.option("--skip-speed", is_flag=True, help="Quality and cost only: no speed benches.")
@click.option("--ray-address", default=None,
              help="Run the teacher passes on this cluster ('auto', 'ray://host:port'); default: a local one.")
def report_cmd(out, seeds, quick, epochs, preset, teachers, skip_speed, ray_address):
    """Quality over seeds (teachers and five students), speed ratios and cost, as JSON, markdown and plots."""
    cfg = ReportConfig(out=out, seeds=seeds, quick=quick, epochs=epochs, preset=preset, teachers=teachers,
                       skip_speed=skip_speed, ray_address=ray_address)
    run_report(cfg, echo=click.echo)
