"""`mcad bench store` smoke run at a tiny size: the JSON shape, and the ratio is the quotient of its figures."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.store import StoreBenchConfig, raw_payload_bytes, synth_columns
from mcad.jobs.cli import main
from mcad.storage import schema
from mcad.storage.writer import build_table


def test_bench_store_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "store", "--rows", "200", "--shards", "2",
                                       "--json", str(out), "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert json.loads(result.stdout) == got
    assert set(got) >= {"bench", "ratios", "figures", "machine"} and got["bench"] == "store"
    fig = got["figures"]
    assert fig["raw_payload_bytes"] == raw_payload_bytes(d=256, f=256, k=32) == 2828
    assert got["ratios"]["bytes_over_raw_payload"] == pytest.approx(fig["bytes_per_sample"] / fig["raw_payload_bytes"])
    assert fig["reader_rows_per_s"] > 0 and fig["remix_rows_per_s"] > 0 and fig["rows"] == 200
    assert got["ratios"]["verified_over_unverified"] == pytest.approx(
        fig["reader_rows_per_s"] / fig["reader_unverified_rows_per_s"])
    assert fig["verify_files_s"] > 0
    assert {"cpus", "platform", "torch_threads"} <= set(got["machine"])
    assert list(tmp_path.iterdir()) == [out]  # the temporary store is gone


def test_synthetic_columns_pass_the_writers_checks():
    import numpy as np

    cfg = StoreBenchConfig(rows=37, d=8, f=4, k=5, pool_size=16)  # last pool of 5 rows: padding
    cols = synth_columns([f"k{i}" for i in range(cfg.rows)], cfg=cfg, rng=np.random.default_rng(0))
    table = build_table("s", cols, d=cfg.d, f=cfg.f, k=cfg.k, pool_size=cfg.pool_size)  # raises if invalid
    assert table.num_rows == 37
    for dr in schema.DIRECTIONS:
        dual = cols[schema.col(dr, schema.DUAL)]
        assert (np.diff(np.where(np.isfinite(dual), dual, -1e30), axis=1) <= 0).all()  # best first
