"""`candidate_histograms`: the per-row top-1 probability and entropy of each candidate softmax, binned in DuckDB,
against the same figures computed with numpy from the stored logits."""
from __future__ import annotations

import math

import numpy as np

from mcad.storage import schema
from mcad.storage.query import LOGIT_FIELDS, candidate_histograms, candidate_stats, connect


def _numpy_values(logits: list[list[float]], t: float) -> tuple[list[float], list[float]]:
    top1, entropy = [], []
    for row in logits:
        x = np.array([v for v in row if math.isfinite(v)], dtype=np.float64) / t
        if not len(x):
            continue
        p = np.exp(x - x.max())
        p /= p.sum()
        top1.append(float(p.max()))
        entropy.append(float(-(p * np.log(p)).sum()))
    return top1, entropy


def _binned(values, hi, bins):
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, math.floor(v / hi * bins)))] += 1
    return counts


def test_histograms_match_numpy_at_each_temperature(tmp_path, make_store):
    store = make_store(tmp_path / "store", k=4)
    con = connect(store)
    got = candidate_histograms(con, k=4, temperatures=(1.0, 4.0), bins=10)
    assert got["edges"]["top1"][-1] == 1.0 and got["edges"]["entropy"][-1] == math.log(4)
    rows = con.sql("SELECT count(*) FROM signals").fetchall()[0][0]
    for t in (1.0, 4.0):
        for dr in schema.DIRECTIONS:
            for short, field in LOGIT_FIELDS.items():
                logits = [r[0] for r in con.sql(f"SELECT {schema.col(dr, field)} FROM signals").fetchall()]
                top1, entropy = _numpy_values(logits, t)
                series = got[f"T={t:g}"][dr][short]
                assert series["top1"] == _binned(top1, 1.0, 10)
                assert series["entropy"] == _binned(entropy, math.log(4), 10)
                assert sum(series["top1"]) == len(top1) <= rows
    # A higher temperature flattens: the mean top-1 falls (the counts move to lower bins).
    mean = {t: np.dot(got[f"T={t:g}"]["i2t"]["dual"]["top1"], np.arange(10)) for t in (1.0, 4.0)}
    assert mean[4.0] < mean[1.0]
    # candidate_stats (T = 1) shares the per-row SQL: its means are those of the same values.
    logits = [r[0] for r in con.sql(f"SELECT {schema.col('i2t', schema.DUAL)} FROM signals").fetchall()]
    top1, entropy = _numpy_values(logits, 1.0)
    stats = candidate_stats(con)["i2t"]["dual"]
    assert math.isclose(stats["top1"], np.mean(top1), rel_tol=1e-9)
    assert math.isclose(stats["entropy"], np.mean(entropy), rel_tol=1e-9)
