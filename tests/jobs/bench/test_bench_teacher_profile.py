"""`mcad bench teacher-pass --profile` at smoke size: the JSON shape and its arithmetic (never timings);
the accelerator side (peaks, MFU, --device) as far as a machine without CUDA can check it."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error, invoke
from mcad.jobs.bench.machine import PEAK_FLOPS, accelerator_key, peak_flops
from mcad.jobs.bench.teacher_profile import MODEL_STAGES, STAGES, StageClock, format_profile
from mcad.jobs.cli.bench import teacher_pass_bench


def test_stage_clock_counts_nested_time_once(monkeypatch):
    import mcad.jobs.bench.teacher_profile as profile

    now = [0.0]  # a clock the test moves: no sleeps, no load-dependent timings
    monkeypatch.setattr(profile, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = StageClock()
    with clock.stage("signal_maths"):
        now[0] += 0.02
        with clock.stage("itm_pairs"):
            now[0] += 0.03
        now[0] += 0.01
    assert clock.seconds["itm_pairs"] == pytest.approx(0.03)
    assert clock.seconds["signal_maths"] == pytest.approx(0.03)
    assert list(clock.wrap_iter("read_decode", [1, 2])) == [1, 2]
    synced = []
    with StageClock(sync=lambda: synced.append(now[0])).stage("write"):
        now[0] += 1.0
    assert len(synced) == 2  # a device is synchronised as each stage starts and ends


def test_profile_smoke(tmp_path):
    out, work = tmp_path / "profile.json", tmp_path / "work"
    work.mkdir()
    result = CliRunner().invoke(teacher_pass_bench, [
        "--profile", "--size", "smoke", "--samples", "12", "--shards", "2", "--pool", "6", "--topk", "2",
        "--device", "cpu", "--peak-tflops", "0.5", "--json", str(out), "--dir", str(work)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["mode"] == "profile" and set(got["ratios"]) == {"itm_cached_over_uncached",
                                                                "pass_cached_over_uncached"}
    fig = got["figures"]
    assert fig["samples"] == 12 and 1 <= fig["pairs_per_sample"] <= 2 * 2 + 1
    assert set(fig["stage_share"]) == set(STAGES) and sum(fig["stage_share"].values()) == pytest.approx(1)
    assert set(fig["flops_per_sample"]) == set(MODEL_STAGES)
    assert fig["flops_per_sample"]["itm_pairs"] < fig["uncached"]["flops_per_sample"]["itm_pairs"]
    # The stages cover the loop's wall time. The read-ahead (prefetch=1) reads, decodes and prepares
    # pixels beside the teachers, so only the other stages must also fit within it: a bound on the
    # whole sum failed on a loaded machine (1.06), where the overlap grows.
    share = fig["stage_share"]
    assert fig["stage_sum_over_total"] >= 0.95
    assert fig["stage_sum_over_total"] * (1 - share["read_decode"] - share["preprocess"]) <= 1.05
    for run in ("cached", "uncached"):
        assert fig[run]["samples_per_s"] == pytest.approx(12 / fig[run]["total_seconds"])
    assert got["ratios"]["pass_cached_over_uncached"] == pytest.approx(
        fig["cached"]["samples_per_s"] / fig["uncached"]["samples_per_s"])
    assert got["ratios"]["itm_cached_over_uncached"] == pytest.approx(
        fig["cached"]["itm_pairs_per_s"] / fig["uncached"]["itm_pairs_per_s"])
    assert "ITM pairs" in result.output and "itm_cached_over_uncached" in result.output
    assert list(work.iterdir()) == []

    # the device side: the CPU in float32, MFU against the given peak
    assert fig["device"] == {"type": "cpu", "name": "cpu", "dtype": "float32", "peak_flop_per_s": 0.5e12,
                             "peak_source": "given", "memory_bytes": None}
    assert fig["attention"] == {"dual": "sdpa", "single": "eager"}
    for run in ("cached", "uncached"):
        r = fig[run]
        assert set(r["mfu"]) == set(r["flop_per_s"]) == set(MODEL_STAGES)
        for s in MODEL_STAGES:
            assert r["mfu"][s] == pytest.approx(r["flop_per_s"][s] / 0.5e12)
            assert r["samples_per_s_by_stage"][s] == pytest.approx(1 / r["seconds_per_sample"][s])
        assert r["pass_mfu"] == pytest.approx(sum(r["flops_per_sample"].values()) * r["samples_per_s"] / 0.5e12)
    assert "MFU" in result.output and "peak 0.5 TFLOP/s (given)" in result.output

    # without a known peak (a CPU, an unlisted GPU) MFU reads n/a
    got["figures"]["device"].update(peak_flop_per_s=None, peak_source="unknown")
    for run in ("cached", "uncached"):
        fig[run]["mfu"] = dict.fromkeys(fig[run]["mfu"])
        fig[run]["pass_mfu"] = None
    table = format_profile(got)
    assert "peak unknown: MFU n/a" in table
    assert all(" n/a" in line for line in table.splitlines() if line.startswith(("dual image", "ITM pairs")))


def test_peak_table_reads_torch_device_names():
    assert accelerator_key("NVIDIA H200") == "H200" and accelerator_key("NVIDIA H100 80GB HBM3") == "H100"
    assert accelerator_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert accelerator_key("NVIDIA A100 80GB PCIe") == "A100 PCIe"
    assert accelerator_key("Tesla V100-PCIE-16GB") == "V100 PCIe" and accelerator_key("NVIDIA H100 NVL") == "H100 NVL"
    assert peak_flops("NVIDIA H200", "bfloat16") == peak_flops("NVIDIA H100 80GB HBM3", "float16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
    assert peak_flops("NVIDIA L4", "bfloat16") == 121e12 and peak_flops("NVIDIA A10G", "bfloat16") == 70e12
    assert peak_flops("Tesla T4", "bfloat16") is None  # no bfloat16 on Turing: the pass uses float16 there
    assert peak_flops("NVIDIA H100 NVL", "bfloat16") is None and peak_flops(None, "float32") is None  # unknown, CPU
    assert all(set(v) <= {"bfloat16", "float16", "float32"} for v in PEAK_FLOPS.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    result = invoke("bench", "teacher-pass", "--size", "smoke", "--device", "cuda", "--dir", tmp_path)
    assert_one_line_error(result, "--device cuda", "no CUDA device")
    assert list(tmp_path.iterdir()) == []  # refused before anything was built
    assert_one_line_error(invoke("bench", "teacher-pass", "--profile", "--device", "tpu"), "expected cpu, cuda")
    assert_one_line_error(invoke("bench", "teacher-pass", "--dtype", "float16"), "add --profile")
