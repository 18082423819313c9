"""Arms against a report's own runs: means over seeds, paired t-intervals, paired bootstrap per seed.

`compare` takes, per seed, rows in jobs/bench/arms.py's result form (an arm's
result, or the report's own run by arms.report_row) and the references: names
whose rows are the report's runs, each with the name of its ranks in the
report's seed folder (DIR/seed_N/ranks/<method>.npz). The ranks of every other
name are the arm's own (OUT/seed_N/ranks/<name>.npz). It returns:

- "summary": per name, mean and sd over seeds of the final val rsum, test mean
  R@1 (i2t and t2i averaged), i2t and t2i R@1, rsum, pass and student seconds,
  and the mean bytes per sample by table. A figure a row lacks is None: a
  teacher evaluation has no val rsum and no cost;
- "paired": reference -> name -> metric -> report_stats.paired_interval of
  (name − reference) over the seeds: the mean and its 95 % t-interval,
  mean ± t(0.975, n−1)·sd/√n, "significant" when it excludes 0. The names
  compared with a reference are report_stats.paired_names' choice: every
  other name except the references listed before it (that pair is shown the
  other way round already);
- "bootstrap": seed -> reference -> name -> student.metrics.paired_bootstrap
  over that seed's test queries (report_stats.bootstrap_pairs, 2,000 resamples,
  an image with its captions as the unit).

Used by `mcad bench views` (jobs/bench/views_tables.py) and `mcad bench levers`
(jobs/bench/levers.py).
"""
from __future__ import annotations

import statistics
from pathlib import Path


def summary(rows: list[dict]) -> dict:
    """One name's figures over its seeds' rows (mean and sd; None where the rows lack a figure)."""
    from mcad.jobs.bench.report_stats import mean_r1, mean_std

    tests = [r["test"] for r in rows]
    sizes = [r.get("bytes_per_sample") for r in rows]
    return {"val_rsum": _mean_std([r.get("val_rsum") for r in rows]),
            "test_mean_R@1": mean_std([mean_r1(t) for t in tests]),
            "test_i2t_R@1": mean_std([t["i2t"]["R@1"] for t in tests]),
            "test_t2i_R@1": mean_std([t["t2i"]["R@1"] for t in tests]),
            "test_rsum": mean_std([t["rsum"] for t in tests]),
            "pass_seconds": _mean_std([r.get("pass_seconds") for r in rows]),
            "student_seconds": _mean_std([r.get("student_seconds") for r in rows]),
            "bytes_per_sample": (None if None in sizes else
                                 {k: _fmean([s[k] for s in sizes]) for k in sizes[0]})}


def _mean_std(values: list) -> dict | None:
    from mcad.jobs.bench.report_stats import mean_std

    values = [v for v in values if v is not None]
    return mean_std(values) if values else None


def _fmean(values: list) -> float | None:
    return None if None in values else statistics.fmean(values)


def compare(report: Path, out: Path, seeds: list[int], runs: dict[int, dict[str, dict]],
            references: dict[str, str]) -> dict:
    """{"summary", "paired", "bootstrap"} (the module doc) of runs: seed -> name -> row, the same names on
    every seed; references: name -> its ranks' name in the report's seed folder, in the order compared."""
    from mcad.jobs.bench.report_stats import bootstrap_pairs, paired_differences, paired_names
    from mcad.jobs.demo import load_ranks

    names = list(runs[seeds[0]])
    order = tuple(references)
    blocks = {str(s): {"students": {k: r["test"] for k, r in runs[s].items()}} for s in seeds}
    pairs = paired_names(names, order)
    paired = paired_differences(blocks, pairs)
    bootstrap = {}
    for s in seeds:
        ranks = {name: (load_ranks(report / f"seed_{s}", references[name]) if name in references
                        else load_ranks(out / f"seed_{s}", name)) for name in names}
        bootstrap[str(s)] = bootstrap_pairs(ranks, pairs, s)
    return {"summary": {name: summary([runs[s][name] for s in seeds]) for name in names},
            "paired": paired, "bootstrap": bootstrap}
