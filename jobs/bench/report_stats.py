"""The report's statistics over seeds: summaries, differences against the baseline, paired intervals.

From each seed's results (the demo's results.json, regrouped per method by
`method_evals`): the mean and sample std per method (`summarize`), each
student minus the same seed's baseline (`ablation`), the paired difference
against the baseline and dual-only KD with a 95 % interval over seeds (t:
`paired_differences`, `paired_interval`, `t975`), and per seed a paired
bootstrap over the test queries (`bootstrap_differences`, `bootstrap_pairs`,
student.metrics.paired_bootstrap). Pure Python (statistics, math); the
bootstrap imports its pieces when called.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from mcad.jobs.bench.report_methods import METHODS, STUDENTS, TEACHERS


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


# Two-sided 95 % quantile t(0.975, df) of Student's t, df = 1 .. 30 (no scipy here).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
# Each student minus the same seed's run of these: the baseline and dual-only KD (what MCAD claims to
# beat), then full MCAD (what each ablation loses). A pair already shown the other way round is not repeated.
PAIRED_REFERENCES = ("baseline", "dual_kd", "mcad")


# Full MCAD against each teacher of the same seed: is the student above the dual teacher, how far below the
# combined one it learns from.
TEACHER_PAIRS = {f"teacher_{t}": ["mcad"] for t in ("dual", "single", "combined")}


def report_pairs() -> dict[str, list[str]]:
    """reference -> the runs compared with it in the report: the students (paired_names), then the teachers."""
    return {**paired_names(STUDENTS), **TEACHER_PAIRS}


def paired_names(names, references: tuple[str, ...] = PAIRED_REFERENCES) -> dict[str, list[str]]:
    """reference -> the students compared with it: every other one, except an earlier reference
    (their difference is already shown, with the other sign, under that reference)."""
    return {ref: [n for n in names if n != ref and n not in references[:i]] for i, ref in enumerate(references)}


def t975(df: int) -> float:
    """t(0.975, df); above 30 the Cornish-Fisher expansion around the normal 1.96 (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(diffs: list[float]) -> dict:
    """Mean of paired differences and its 95 % interval over seeds: mean ± t(0.975, n-1) * sd / sqrt(n).
    With one seed there is no interval (low = high = None); `significant`: the interval excludes 0."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "n": n, "low": None, "high": None, "significant": None}
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "n": n, "low": mean - half, "high": mean + half,
            "significant": not (mean - half <= 0.0 <= mean + half)}


def mean_r1(ev: dict) -> float:
    """The headline figure: R@1 averaged over both directions."""
    return (ev["i2t"]["R@1"] + ev["t2i"]["R@1"]) / 2


def bootstrap_differences(out: Path, seeds: list[int]) -> dict:
    """seed -> reference -> student -> paired_bootstrap over that seed's test queries (ranks kept by
    the seed's run, OUT/seed_N/ranks/); a seed run before ranks were kept is left out."""
    from mcad.jobs.demo import RANKS_DIR, load_ranks

    result = {}
    for seed in seeds:
        folder = out / f"seed_{seed}"
        if not (folder / RANKS_DIR).is_dir():
            continue
        pairs = report_pairs()
        ranks = {name: load_ranks(folder, name) for name in {*pairs, *(n for v in pairs.values() for n in v)}
                 if (folder / RANKS_DIR / f"{name}.npz").is_file()}
        result[str(seed)] = bootstrap_pairs(ranks, pairs, seed)
    return result


def bootstrap_pairs(ranks: dict[str, dict], pairs: dict[str, list[str]], seed: int) -> dict:
    """reference -> name -> paired_bootstrap of (name - reference) over one seed's test queries; `ranks`:
    name -> its kept ranks (jobs.demo.load_ranks), `pairs`: reference -> the names compared with it."""
    from mcad.student.metrics import paired_bootstrap

    out = {ref: {name: paired_bootstrap(ranks[name], ranks[ref], n_boot=BOOTSTRAP_RESAMPLES, seed=seed)
                 for name in names if name in ranks}
           for ref, names in pairs.items() if ref in ranks}
    return {ref: block for ref, block in out.items() if block}


BOOTSTRAP_RESAMPLES = 2000


def paired_differences(per_seed: dict, pairs: dict[str, list[str]] | None = None) -> dict:
    """reference -> run -> metric -> paired_interval of (run - reference) over the seeds both ran.

    per_seed: report.json's "per_seed" (seed -> {"students": {name: EVAL}, "teachers": {name: EVAL}}; a
    teacher is named teacher_<name>); works on reports written before this function existed. Metrics:
    i2t_R@1, t2i_R@1, mean_R@1 (their average), rsum. pairs: reference -> the runs compared with it
    (default: report_pairs()); a pair no seed ran is left out."""
    out: dict = {}
    blocks = [{**per_seed[k]["students"], **{f"teacher_{t}": ev for t, ev in per_seed[k].get("teachers", {}).items()}}
              for k in sorted(per_seed, key=int)]
    for ref, compared in (report_pairs() if pairs is None else pairs).items():
        out[ref] = {}
        for name in compared:
            both = [(b[name], b[ref]) for b in blocks if name in b and ref in b]
            if not both:
                continue
            out[ref][name] = {
                "i2t_R@1": paired_interval([r["i2t"]["R@1"] - b["i2t"]["R@1"] for r, b in both]),
                "t2i_R@1": paired_interval([r["t2i"]["R@1"] - b["t2i"]["R@1"] for r, b in both]),
                "mean_R@1": paired_interval([mean_r1(r) - mean_r1(b) for r, b in both]),
                "rsum": paired_interval([r["rsum"] - b["rsum"] for r, b in both]),
            }
    return {ref: block for ref, block in out.items() if block}
