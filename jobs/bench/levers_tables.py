"""`mcad bench levers`'s tables: OUT/levers.md and the terminal summary, from levers.json's dict.

- Arms: what each changes on full MCAD, and whether it made a new pass.
- Test: per run (the dual teacher, dual-only KD, full MCAD, then the arms in
  the order given): the final val rsum, test mean R@1 and rsum (mean ± sd over
  seeds), and each arm minus the same seed's full MCAD (95 % t-interval over
  seeds, "not significant" where it covers 0).
- Goal figures: full MCAD and each arm minus dual-only KD and minus the dual
  teacher, with the same intervals.
- Cost: pass seconds and store bytes per sample (an arm on the report's store
  gets the report's figures), and student seconds.
- Per seed: the paired bootstrap over the test queries against each reference.

The run is jobs/bench/levers.py; the statistics jobs/bench/arms_tables.py.
"""
from __future__ import annotations

LABELS = {"teacher_dual": "dual teacher (CLIP)", "dual_kd": "dual-only KD (alpha = beta = 0)",
          "mcad": "full MCAD (the report's)"}


def _label(result: dict, name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    changes = result["arms"][name]["spec"].split(":", 1)[1]  # in the order given (the JSON's dicts are sorted)
    return f"{name}: {changes.replace(',', ', ').replace('=', ' = ')}"


def _changes(overrides: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in overrides.items())


def _order(result: dict) -> list[str]:
    """The references, then the arms in the order given (levers.json's keys are sorted)."""
    return [*result["references"], *(s.split(":", 1)[0] for s in result["config"]["arms"])]


def _ci(result: dict, ref: str, name: str, metric: str) -> str:
    from mcad.jobs.bench.report_render import ci_text

    if name == ref:
        return "reference"
    d = result["paired"].get(ref, {}).get(name)
    return ci_text(d[metric]) if d else "—"


def _pm(s: dict | None, digits: int = 1) -> str:
    from mcad.jobs.bench.report_render import pm_text

    return "n/a" if s is None else pm_text(s, digits)


def quality_table(result: dict) -> list[str]:
    from mcad.jobs.bench.report_render import md_table

    rows = [["run", "val rsum (last epoch)", "test mean R@1", "test rsum", "Δ mean R@1 vs full MCAD",
             "Δ rsum vs full MCAD"]]
    for name in _order(result):
        s = result["summary"][name]
        arm = name not in result["references"]
        rows.append([_label(result, name), _pm(s["val_rsum"], 2), _pm(s["test_mean_R@1"]), _pm(s["test_rsum"]),
                     _ci(result, "mcad", name, "mean_R@1") if arm or name == "mcad" else "",
                     _ci(result, "mcad", name, "rsum") if arm or name == "mcad" else ""])
    return md_table(rows)


def goal_table(result: dict) -> list[str]:
    from mcad.jobs.bench.report_render import md_table

    rows = [["run", "Δ mean R@1 vs dual-only KD", "Δ rsum vs dual-only KD", "Δ mean R@1 vs dual teacher",
             "Δ rsum vs dual teacher"]]
    for name in _order(result)[1:]:
        rows.append([_label(result, name), _ci(result, "dual_kd", name, "mean_R@1"),
                     _ci(result, "dual_kd", name, "rsum"), _ci(result, "teacher_dual", name, "mean_R@1"),
                     _ci(result, "teacher_dual", name, "rsum")])
    return md_table(rows)


def _kib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1024:.1f} KiB"


def cost_table(result: dict) -> list[str]:
    from mcad.jobs.bench.report_render import md_table

    rows = [["run", "store", "pass s", "store bytes / sample (of which signals)", "student s"]]
    for name in _order(result)[2:]:
        s, arm = result["summary"][name], result["arms"].get(name)
        store = f"new pass: {_changes(arm['passes'])}" if arm and arm["passes"] else "the report's"
        b = s["bytes_per_sample"] or {}
        rows.append([_label(result, name), store, _pm(s["pass_seconds"], 0),
                     f"{_kib(b.get('total'))} ({_kib(b.get('signals'))})",
                     _pm(s["student_seconds"], 0)])
    return md_table(rows)


def markdown(result: dict) -> str:
    from mcad.jobs.bench.report_render import boot_text, md_table

    seeds, student = result["seeds"], result["pinned"]["student"]
    settings = ", ".join(f"{k} = {student[k]}" for k in ("preset", "epochs", "alpha", "beta", "kd_temperature",
                                                           "w_rank", "itm_norm", "itm_temperature") if k in student)
    lines = ["# Single-teacher levers on the shapes benchmark (issue #18)", "",
             f"    {result['command']}", "",
             f"Reuses the report in `{result['pinned']['report']}` (seeds {', '.join(map(str, seeds))}): each "
             "seed's benchmark, teachers and store, and three of its runs every arm is paired with (same seed, "
             "same data): its full-MCAD student (same initialisation and settings; only the arm's changes "
             "differ), its dual-only KD student and its dual teacher. Full-MCAD settings: "
             f"{settings}. The protocol: each arm's values are chosen beforehand on seed 0's val split "
             "(`mcad bench select`); test is read here once per seed and arm.", "",
             "Mean ± sd over seeds. Δ: the run minus the same seed's reference, mean and its 95 % interval over "
             "seeds (mean ± t(0.975, n−1)·sd/√n; \"not significant\": it covers 0). Mean R@1 is the average of "
             "i2t and t2i R@1.", "",
             "## Test", "", *quality_table(result), "",
             "## Goal figures: above dual-only KD and the dual teacher", "", *goal_table(result), "",
             "## Cost", "",
             f"Seconds on this machine ({result['machine'].get('cpus')} CPUs). A run on the report's store: the "
             "report's pass seconds and bytes. Student s: the wall time of a seed's students trained side by side "
             "over their number (the machine's seconds per student, as the report's cost).", "",
             *cost_table(result), ""]
    boot = result["bootstrap"]
    first = next(iter(next(iter(boot[str(seeds[0])].values())).values()))
    lines += ["## Per seed: paired bootstrap over the test queries", "",
              f"Δ mean R@1 against the same seed's reference, {first['level']:.0%} percentile interval from "
              f"{first['n_boot']} paired resamples of the test images (an image with its captions is the unit).", ""]
    for ref in result["references"]:
        names = [n for n in _order(result) if n in boot[str(seeds[0])].get(ref, {})]
        if not names:
            continue
        lines += [f"Against {LABELS[ref]}:", ""]
        rows = [["run", *(f"seed {s}" for s in seeds)]]
        rows += [[_label(result, n), *(boot_text(boot[str(s)][ref][n]["mean"]) for s in seeds)] for n in names]
        lines += [*md_table(rows), ""]
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """The test and goal tables, for the terminal."""
    return "\n".join([*quality_table(result), "", *goal_table(result)])
