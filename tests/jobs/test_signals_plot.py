"""`mcad signals stats --plot PNG`: the histograms (from storage.query) drawn, and written with --json."""
from __future__ import annotations

import json

from helpers import invoke


def test_stats_plot_draws_histograms_and_rejects(tmp_path, make_store):
    from PIL import Image

    from mcad.student.config import TrainConfig

    store = make_store(tmp_path / "store", k=3, rejects_per_shard=2)
    png, out = tmp_path / "stats.png", tmp_path / "stats.json"
    result = invoke("signals", "stats", store, "--plot", png, "--json", out)
    assert result.exit_code == 0, result.output
    assert f"plot -> {png}" in result.output
    assert Image.open(png).size[0] > 1000
    figures = json.loads(out.read_text())
    hist = figures["histograms"]
    assert set(hist) == {"bins", "edges", "T=1", f"T={TrainConfig.kd_temperature:g}"}
    for temp in ("T=1", f"T={TrainConfig.kd_temperature:g}"):
        for direction in ("i2t", "t2i"):
            for teacher in ("dual", "itm"):
                assert sum(hist[temp][direction][teacher]["top1"]) == figures["rows"]
    assert sum(figures["rejects_by_reason"].values()) == figures["rejected"] > 0
