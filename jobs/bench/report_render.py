"""The report's markdown tables and PNG plots, from the report dict `mcad bench report` builds."""
from __future__ import annotations

from pathlib import Path

from mcad.jobs.bench.report_stats import paired_differences
from mcad.pipeline.shapes import DEMO_TEACHERS, DEMO_TEACHERS_SEEDS

FIGURES = (("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"))


# ------------------------------------------------------------------ tables

def pm_text(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def md_table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _shipped(teachers: str) -> bool:
    """The shipped demo teachers' folder, in this checkout or another (a report run from a clone)."""
    return Path(teachers).parts[-3:] == DEMO_TEACHERS.parts[-3:]


def quality_rows(report: dict) -> list[list[str]]:
    rows = [["method", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"]]
    for m in report["methods"]:
        s = report["summary"][m]
        rows.append([report["labels"][m], *(pm_text(s[d][k]) for d, k in FIGURES), pm_text(s["rsum"])])
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
    from mcad.jobs.bench.presets import table_rows

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
        + (" (the shipped demo teachers, bootstrapped on a seed-0 train split that holds out the val and test "
           f"meanings of seeds 0-{DEMO_TEACHERS_SEEDS - 1}: see its README)."
           if _shipped(c["teachers"]) else "."),
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), load average at the end {m['load_average'][0]:.2f}. "
        f"Seed stages {report['stage_seconds_total']:.0f} s in all; this invocation {report['seconds']:.0f} s "
        f"(seeds kept from an earlier run: {report['skipped_seeds'] or 'none'}).", "",
        "## Quality (test split, recall %, mean ± sample std over seeds)", "",
        *md_table(quality_rows(report)), "",
        "R@1 of each seed (image→text / text→image); `mcad eval --model seed_N/runs/METHOD/model "
        "--data seed_N/data/test` prints a student's, `mcad eval --model TEACHERS/dual --single "
        f"TEACHERS/single --beta {d.get('teacher_beta', 'BETA')} --data seed_N/data/test` the teachers' "
        "(β of the combined score, chosen on val by `mcad teachers bootstrap`).", "",
        *md_table(per_seed_rows(report)), "",
        "## Ablations against the contrastive baseline",
        "",
        "Differences to the baseline student of the same seed (same data, same store), mean ± std over seeds.",
        "",
    ]
    rows = [["student", "Δ i2t R@1", "Δ t2i R@1", "Δ rsum"]]
    for method, a in report["ablation_vs_baseline"].items():
        rows.append([report["labels"][method], pm_text(a["i2t_R@1"]), pm_text(a["t2i_R@1"]), pm_text(a["rsum"])])
    lines += [*md_table(rows), ""]
    lines += paired_markdown(report)
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
        lines += [*md_table(rows), "",
                  f"Student step (ms): {f['plain_ms_per_step']:.1f} contrastive, {f['mcad_stored_ms_per_step']:.1f} "
                  f"MCAD from the store, {f['mcad_online_ms_per_step']:.1f} MCAD with the teachers online "
                  f"(batch {f['batch_size']}). Store: {speed['store']['figures']['bytes_per_sample']:.0f} bytes "
                  f"per sample, reader {speed['store']['figures']['reader_rows_per_s']:,.0f} rows/s. "
                  f"Full JSON of each bench: `speed/bench-<name>.json`.", ""]
        kept = [name for name, b in speed.items() if b.get("kept")]
        if kept:
            lines += [f"Kept from an earlier run of the report (found in `speed/`, not measured again): "
                      f"{', '.join(kept)}.", ""]
    co = report["cost"]
    lines += ["## Cost", "",
              *md_table([["figure", "value"],
                          ["teacher pass (s, mean over seeds)", f"{co['teacher_pass_s']:.1f}"],
                          ["student run from the store (machine s: students stage / students)",
                           f"{co['student_s']:.1f}"],
                          ["one student's wall time, side by side with the others (s, mean)",
                           f"{co['student_s_all_methods']:.1f}"],
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
        lines += [*md_table(table_rows(p)), "",
                  f"`{p['command']}`. Parameters: the exported CLIPModel (student heads dropped); FLOPs: torch's "
                  f"count, 2 per multiply-add, one image / one caption of the maximum length; images/s and "
                  f"captions/s: batches of {p['config']['batch']}, model forward only; latency: one text query "
                  f"(tokenize, encode, score against precomputed normalised gallery embeddings, top-10), median "
                  f"of {p['config']['queries']} queries. {p['figures']['single']['latency_note']}.", ""]
    lines += ["## Plots", "", "![recall](recall.png)", "", "![paired differences](paired.png)", ""]
    lines += [f"![{s}](curves_{s}.png)" for s in report["students"]]
    return "\n".join(lines) + "\n"


def _paired(report: dict) -> dict:
    """report.json's paired differences; computed from per_seed for a report written before they were."""
    return report.get("paired_differences") or paired_differences(report["per_seed"])


def ci_text(c: dict, digits: int = 1) -> str:
    if c["low"] is None:
        return f"{c['mean']:+.{digits}f} (1 seed: no interval)"
    text = f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
    return text if c["significant"] else text + " not significant"


def paired_markdown(report: dict) -> list[str]:
    paired = _paired(report)
    n = len(report["seeds"])
    lines = ["## Paired differences, 95 % interval over seeds", "",
             f"Each student minus the same seed's reference student (same data, same store): mean and its 95 % "
             f"interval over the {n} seeds, mean ± t(0.975, n−1)·sd/√n. \"not significant\": the interval "
             f"covers 0. Chart: `paired.png`.", ""]
    for ref, students in paired.items():
        lines += [f"Against {report['labels'].get(ref, ref)}:", ""]
        rows = [["student", "Δ mean R@1", "Δ i2t R@1", "Δ t2i R@1", "Δ rsum"]]
        rows += [[report["labels"].get(m, m), ci_text(d["mean_R@1"]) if "mean_R@1" in d else "n/a",
                  ci_text(d["i2t_R@1"]), ci_text(d["t2i_R@1"]), ci_text(d["rsum"])]
                 for m, d in students.items()]
        lines += [*md_table(rows), ""]
    return lines + bootstrap_markdown(report)


def boot_text(c: dict, digits: int = 1) -> str:
    text = f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
    return text if c["significant"] else text + " not significant"


def bootstrap_markdown(report: dict) -> list[str]:
    """Per seed: each student minus the same seed's reference over the test queries (paired bootstrap)."""
    boot = report.get("bootstrap") or {}
    if not boot:
        return []
    seeds = sorted(boot, key=int)
    first = next(iter(next(iter(boot[seeds[0]].values())).values()))
    lines = ["## Per seed: paired bootstrap over the test queries", "",
             f"Mean R@1 of each student minus the same seed's reference, with a {first['level']:.0%} percentile "
             f"interval from {first['n_boot']} paired resamples of the test images (an image with all its "
             f"captions is the unit). \"not significant\": the interval covers 0.", ""]
    for ref in boot[seeds[0]]:
        lines += [f"Against {report['labels'].get(ref, ref)} (Δ mean R@1):", ""]
        rows = [["student", *(f"seed {s}" for s in seeds)]]
        for m in boot[seeds[0]][ref]:
            rows.append([report["labels"].get(m, m), *(boot_text(boot[s][ref][m]["mean"]) for s in seeds)])
        lines += [*md_table(rows), ""]
    return lines


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------ plots

def _axis_from(ax, label: str, lowest: float, *, margin: float, step: float) -> float:
    """Start `ax`'s y axis at the multiple of `step` at least `margin` under `lowest` (0 at the
    least), and say in its label where it starts when that is not 0; returns the start."""
    bottom = max(0.0, step * ((lowest - margin) // step))
    ax.set_ylim(bottom, None)
    ax.set_ylabel(f"{label}, axis from {bottom:g}" if bottom else label)
    return bottom


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
        a.set_title(f"{title}, mean ± std over {len(report['seeds'])} seed(s)", pad=24 if a is ax else 6)
    # Each axis starts at a round value under its lowest bar (a few points of difference stay visible),
    # and its label says so; the legend sits above the bars, not on them.
    lowest = min(s[m][d]["R@1"]["mean"] - s[m][d]["R@1"]["std"] for m in methods for d in ("i2t", "t2i"))
    _axis_from(ax, "recall (%)", lowest, margin=2.0, step=5.0)
    ax.legend(fontsize=8, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    lowest_sum = min(s[m]["rsum"]["mean"] - s[m]["rsum"]["std"] for m in methods)
    _axis_from(ax_sum, "rsum (%)", lowest_sum, margin=10.0, step=10.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_plot(out: Path, method: str, seeds: list[int], path: Path) -> None:
    """Training loss per step and validation rsum per epoch of one student, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcad.student.curves import METRICS_FILE, read_metrics

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
    ax_loss.set(xlabel="step", ylabel="loss (log)", title=f"{method}: training loss", yscale="log")
    ax_val.set(xlabel="epoch", ylabel="rsum (%)", title=f"{method}: validation recall sum")
    for a in (ax_loss, ax_val):
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_plot(report: dict, path: Path) -> None:
    """Each run minus the same seed's reference, one row of panels per reference (the baseline, dual-only KD,
    full MCAD, then full MCAD against each teacher): the mean difference with its 95 % interval over seeds,
    R@1 both ways (left) and rsum (right); a 0 line; "n.s." where it covers 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = _paired(report)
    heights = [len(students) + 1.2 for students in paired.values()]  # a panel's height follows its rows
    fig, axes = plt.subplots(len(paired), 2, figsize=(11, 1.0 + 0.38 * sum(heights)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2], "height_ratios": heights})
    panels = ((("i2t_R@1", "image→text R@1", "tab:blue", -0.15), ("t2i_R@1", "text→image R@1", "tab:orange", 0.15)),
              (("rsum", "rsum", "tab:gray", 0.0),))
    for row, (ref, students) in zip(axes, paired.items()):
        names = list(students)
        for ax, series in zip(row, panels):
            ax.axvline(0.0, color="black", lw=0.8)
            for key, label, color, off in series:
                for y, name in enumerate(names):
                    c = students[name][key]
                    err = None if c["low"] is None else [[c["mean"] - c["low"]], [c["high"] - c["mean"]]]
                    ax.errorbar(c["mean"], y + off, xerr=err, fmt="o", color=color, capsize=3, ms=4,
                                label=label if y == 0 else None)
                    if c["significant"] is False:
                        ax.annotate("n.s.", (c["high"], y + off), xytext=(4, -3), textcoords="offset points",
                                    fontsize=7, color="dimgray")
            ax.set_yticks(range(len(names)), names)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.grid(axis="x", alpha=0.3)
        row[0].set_title(f"R@1 − {ref} (same seed), points", fontsize=9)
        row[1].set_title(f"rsum − {ref} (same seed), points", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"paired differences: mean and 95 % interval over {len(report['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
