"""mcad bench presets on smoke-size teachers: real parameter counts, positive speeds, the JSON shape."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.presets import PresetsBenchConfig, format_table, run_presets_bench
from mcad.jobs.cli.bench import presets_bench
from mcad.jobs.cli import main
from mcad.storage.errors import InputError

SMALL = ["--batch", "8", "--batches", "1", "--gallery", "100", "--queries", "2", "--threads", "1"]


def test_presets_bench_counts_and_times(teachers_dir, tiny_teachers, tmp_path):
    import torch

    from mcad.pipeline.teachers import load_teachers
    from mcad.student.models import build_student

    out = tmp_path / "presets.json"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(presets_bench, ["--teachers", str(teachers_dir), "--presets", "smoke,s",
                                                *SMALL, "--json", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["bench"] == "presets" and {"ratios", "figures", "machine", "config"} <= got.keys()
    assert got["config"]["models"] == ["smoke", "s", "dual", "single"]
    assert set(got["figures"]) == set(got["config"]["models"])
    dual, single = load_teachers(*tiny_teachers, device="cpu", dtype=torch.float32)
    expected = {name: sum(p.numel() for p in build_student(name, tokenizer_from=tiny_teachers[0],
                                                           teacher_dim=dual.dim)[0].clip.parameters())
                for name in ("smoke", "s")}
    expected["dual"] = sum(p.numel() for p in dual.model.parameters())
    expected["single"] = sum(p.numel() for p in single.model.parameters())
    for name, row in got["figures"].items():
        assert row["params"] == expected[name]
        assert 0 <= row["params"] - row["params_vision"] - row["params_text"] <= 1  # CLIP: + logit_scale
        assert row["flops_per_image"] > 0 and row["images_per_s"] > 0 and row["latency_ms"] > 0
    for name in ("smoke", "s", "dual"):
        assert got["figures"][name]["flops_per_caption"] > 0 and got["figures"][name]["captions_per_s"] > 0
    single_row = got["figures"]["single"]
    assert single_row["captions_per_s"] is None and single_row["pairs_per_s"] > 0 and single_row["flops_per_pair"] > 0
    # The s preset is larger than smoke: the counts follow the shapes, not a constant.
    assert got["figures"]["s"]["params"] > got["figures"]["smoke"]["params"]
    assert got["figures"]["s"]["flops_per_image"] > got["figures"]["smoke"]["flops_per_image"]
    f = got["figures"]
    assert got["ratios"]["s_params_over_dual"] == pytest.approx(f["s"]["params"] / f["dual"]["params"])
    assert got["ratios"]["smoke_latency_over_dual"] == pytest.approx(f["smoke"]["latency_ms"] / f["dual"]["latency_ms"])
    assert got["machine"]["torch_threads"] == 1 and torch.get_num_threads() == threads  # restored
    assert "student s" in result.output and "teacher single" in result.output


def test_presets_table_rows_match_the_figures(teachers_dir):
    result = run_presets_bench(PresetsBenchConfig(teachers=str(teachers_dir), presets=("smoke",), batch=4,
                                                  batches=1, warmup=0, gallery=50, queries=1))
    table = format_table(result)
    smoke = result["figures"]["smoke"]
    assert f"{smoke['flops_per_image'] / 1e6:.1f}" in table and f"{smoke['latency_ms']:.2f}" in table
    assert "pairs/s" in table and "latency 50 gallery" in table


@pytest.mark.parametrize("kw, message", [
    (dict(presets=("xl",)), "unknown student size"),
    (dict(gallery=4), "gallery"),
    (dict(batches=0), "batch"),
])
def test_presets_bench_refuses_bad_input(teachers_dir, kw, message):
    with pytest.raises(InputError, match=message):
        run_presets_bench(PresetsBenchConfig(teachers=str(teachers_dir), **kw))


def test_presets_cli_bad_teachers(tmp_path):
    result = CliRunner().invoke(main, ["bench", "presets", "--teachers", str(tmp_path)])
    assert result.exit_code == 2 and "teacher" in result.output
    result = CliRunner().invoke(main, ["bench", "presets", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output
