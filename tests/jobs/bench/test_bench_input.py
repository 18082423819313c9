"""`mcad bench input` at toy size: the JSON shape, ratios are quotients of their figures, checks hold.

Timings are never asserted (a benchmark, not a test); only what must hold on any machine.
"""
from __future__ import annotations

import json
import tarfile

import pytest
from click.testing import CliRunner

from mcad.jobs.bench.input import InputBenchConfig, gpu_host
from mcad.jobs.bench.input_decode import DRAFT_BOUND
from mcad.jobs.cli.bench import input_bench
from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark
from mcad.storage.errors import InputError

pytestmark = pytest.mark.ray

TOY = ["--samples", "16", "--image-size", "96", "--shard-size", "8", "--pool", "8", "--topk", "3",
       "--epochs", "1", "--per-worker", "8"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_input_on_toy_photos(ray_local, teachers_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(input_bench, [*TOY, "--teachers", str(teachers_dir), "--preset", "smoke",
                                              "--dir", str(tmp_path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["bench"] == "input" and set(got) >= {"ratios", "figures", "machine", "config", "checks"}
    assert set(got["ratios"]) == {"loader_2_over_0", "pass_prefetch_over_serial"}
    fig = got["figures"]
    student, passes = fig["student"], fig["pass"]
    assert got["ratios"]["loader_2_over_0"] == pytest.approx(
        student["workers_2"]["samples_per_s"] / student["workers_0"]["samples_per_s"])
    assert got["ratios"]["pass_prefetch_over_serial"] == pytest.approx(
        passes["prefetch_samples_per_s"] / passes["serial_samples_per_s"])
    default = fig["default_loader_workers"]
    assert fig["data_wait_share"] == student[f"workers_{default}"]["data_wait_share"]
    assert 0 <= fig["data_wait_share"] <= 1
    # Every variant trained on every sample; the pass wrote the serial bytes with the next pool ahead.
    for epochs in got["checks"]["student_epochs"].values():
        assert [e["samples"] for e in epochs] == [16]
    assert passes["files_identical"] and got["checks"]["pass_files_identical"] and passes["rows"] == 16
    rates = fig["input_samples_per_s_per_worker"]
    assert {"student_models_draft", "student_models_full", "pass_models", "student_real_draft",
            "student_real_full", "pass_real", "read_and_decode_full", "read_only"} == set(rates)
    assert all(v > 0 for v in rates.values())
    options = fig["decode_options"]
    assert options["images"] == 8 and options["bound_min_cosine"] == DRAFT_BOUND
    for name in ("pil_draft", "pil_draft_1x", "tensor_full", "reencode_q95"):
        assert -1 <= options[f"{name}_cosine_min"] <= options[f"{name}_cosine_mean"] <= 1 + 1e-6
    # The tiny dual teacher sees 32 px: the student's margin asks the 128x96 JPEGs for 64 px, which a
    # halving (64x48) would not give, so draft mode keeps the full scale: the very same pixels. A margin
    # of 1 (32 px) halves them: other pixels, and still within the stated bound.
    assert options["side"] == 32 and options["draft_margin"] == 2
    assert options["pil_draft_pixel_mean_abs"] == 0 and options["pil_draft_cosine_min"] == pytest.approx(1, abs=1e-6)
    assert options["pil_draft_1x_pixel_mean_abs"] > 0 and options["pil_draft_1x_cosine_min"] >= DRAFT_BOUND
    assert options["draft_within_bound"] is True and options["draft_1x_within_bound"] is True
    for name in ("tensor_full", "reencode_q95"):  # other pixels: never an image compared with itself
        assert options[f"{name}_pixel_mean_abs"] > 0
    photo = fig["photo"]
    assert (photo["width"], photo["height"]) == (128, 96)
    # The mean JPEG size of the 8 timed samples, recomputed from the same shards written again (same seed:
    # the same bytes), read straight from the tar; and in the range of photo-like JPEGs of 128x96 (synth's
    # 40-120 KB at 640x480 over 25 times fewer pixels, plus the headers).
    write_benchmark(SynthConfig(train=16, val=2, test=2, image_size=96, shard_size=8, seed=0, texture="photo"),
                    tmp_path / "again")
    with tarfile.open(tmp_path / "again" / "train" / "000000.tar") as tar:
        jpegs = [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpegs) == 8 and photo["mean_jpeg_bytes"] == pytest.approx(sum(jpegs) / 8)
    assert 2_000 <= photo["mean_jpeg_bytes"] <= 8_000
    host = fig["gpu_host"]
    assert host["cores"] == 16 and host["computed_not_measured"]
    assert host["input_samples_per_s"]["pass_real"] == pytest.approx(16 * rates["pass_real"])
    assert "loader_2_over_0" in result.output and "pass_prefetch_over_serial" in result.output


def test_gpu_host_arithmetic():
    rates = {"pass_real": 100.0, "student_real_draft": 300.0, "student_real_full": 200.0}
    host = gpu_host(rates, 16)
    needs = host["needed_samples_per_s"]
    assert needs["teacher_pass_base"] == pytest.approx(1265, rel=0.01)  # README's roofline (computed)
    assert needs["teacher_pass_large"] == pytest.approx(620, rel=0.01)
    assert host["cover"]["teacher_pass_base"] == pytest.approx(1600 / needs["teacher_pass_base"])
    assert host["gpu_decode_needed"]["teacher_pass_base"] == (1600 < needs["teacher_pass_base"])
    assert host["cover"]["student_clip_b16"] == pytest.approx(4800 / needs["student_clip_b16"])


@pytest.mark.parametrize("kw, message", [(dict(epochs=0), "must be >= 1"), (dict(pool_size=8, topk=9), "topk"),
                                         (dict(samples=8, pool_size=16), "pool")])
def test_bad_config_refused(kw, message):
    with pytest.raises(InputError, match=message):
        InputBenchConfig(**kw)
