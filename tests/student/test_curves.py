"""RUN/loss_curve.png: one log-scale panel per logged loss term, then validation rsum."""
from __future__ import annotations

import json

from PIL import Image

from mcad.student.curves import CURVE_FILE, METRICS_FILE, plot_curves


def _write(run, steps):
    run.mkdir()
    lines = [{"kind": "step", "step": i + 1, "epoch": 0, **terms} for i, terms in enumerate(steps)]
    lines.append({"kind": "epoch", "step": len(steps), "epoch": 0, "val_rsum": 300.0})
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_one_panel_per_logged_term(tmp_path):
    _write(tmp_path / "mcad", [{"loss": 50.0 / (i + 1), "con": 4.0, "dist": 40.0 / (i + 1), "feat": 1.0}
                               for i in range(5)])
    _write(tmp_path / "baseline", [{"loss": 4.0 - i / 10, "con": 4.0 - i / 10} for i in range(5)])
    _write(tmp_path / "ranked", [{"loss": 6.0, "con": 4.0, "dist": 1.0, "feat": 0.5, "rank": 0.5,
                                  "rank_i2t": 0.4, "rank_t2i": 0.6} for i in range(5)])
    widths = {}
    for name in ("mcad", "baseline", "ranked"):
        out = plot_curves(tmp_path / name)
        assert out == tmp_path / name / CURVE_FILE
        widths[name] = Image.open(out).size[0]
    # 3.2 inches at 100 dpi per panel: total, con, dist, feat and rsum; total, con and rsum; with --w-rank
    # also the rank term (its per-direction parts are not panels).
    assert widths == {"mcad": 1600, "baseline": 960, "ranked": 1920}


def test_no_metrics_no_plot(tmp_path):
    assert plot_curves(tmp_path) is None
