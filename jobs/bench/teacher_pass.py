"""`mcad bench teacher-pass`: what Ray costs the teacher pass, and what a second worker buys.

One run builds the shapes benchmark and random teachers of a given size in a
temporary folder, then measures the same shard work three ways on the same
cores: a bare loop in this process (`process_shard` per shard, torch using
every core), the Ray job (`run_teacher_pass`) with 1 worker, and with 2.
Only the shard work is compared; model loading, calibration and actor
start-up are reported apart (see `COVERS`, also written into the JSON).

    mcad bench teacher-pass --json bench-teacher-pass.json       # demo teachers, 512 samples
    mcad bench teacher-pass --size smoke --samples 40 --shards 4  # seconds, for a smoke test

Ratios: ray_over_bare = Ray 1 worker samples/s over bare samples/s (target
>= 0.85); two_workers_over_one = Ray 2 workers over Ray 1 worker. This module
imports nothing heavy (torch, pyarrow, Ray) at module level, so `mcad bench` reads its config's defaults at once
(its click command is in jobs/cli/bench.py).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad.jobs.bench.machine import machine_info

RAY_RUNS = {1: "ray_1_worker", 2: "ray_2_workers"}  # workers -> figure prefix

# What each timing in the JSON covers; written beside the figures so nobody has to guess.
COVERS = {
    "bare_seconds": "this process, before Ray starts, torch.set_num_threads(os.cpu_count()), "
                    "teachers loaded beforehand (not timed), a random W of the right shape (the "
                    "same operations as a calibrated one; calibration is timed on neither side): "
                    "wall time of process_shard (read tar, shard_signals, write_shard) over "
                    "every shard, one after another, the first on cold kernels",
    "ray_N_seconds": "run_teacher_pass on the already-started Ray cluster, threads_per_worker at its "
                     "default: the shard phase only, from the first shard's start to the last "
                     "shard's end (start = end - the shard's own seconds in the manifest, end = "
                     "mtime of its signals file); includes Ray Data's dispatch between shards and "
                     "any idle worker, excludes calibration, actor start and model loading",
    "ray_N_end_to_end_seconds": "the job summary's own `seconds`: store preparation, the "
                                "calibration task (loads the teachers, fits W), actor start, "
                                "model loading in each actor, the shards and the manifest "
                                "updates; Ray cluster start-up excluded (started once before)",
    "samples_per_s": "kept samples (rows written) / the matching seconds",
}


@dataclass(frozen=True)
class TeacherPassBenchConfig:
    """One bench run; P and K default below the job's (256, 32) to keep a CPU run to minutes."""

    size: str = "demo"          # teacher size (pipeline.shapes.teacher_models.TEACHER_SIZES)
    samples: int = 512          # training samples, split evenly over the shards
    shards: int = 4
    pool_size: int = 128
    topk: int = 16
    calibration_rows: int = 128  # W is fitted but not timed; fewer rows, shorter run
    image_size: int = 48
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if self.samples < 1 or self.shards < 1:
            raise InputError(f"samples and shards must be positive, got {self.samples}, {self.shards}")
        if self.shards > self.samples:
            raise InputError(f"shards ({self.shards}) is more than samples ({self.samples})")
        if self.topk > self.pool_size:
            raise InputError(f"topk ({self.topk}) must not exceed pool_size ({self.pool_size})")

    @property
    def shard_size(self) -> int:
        return -(-self.samples // self.shards)  # ceil: never more than `shards` shards


def make_inputs(root: Path, cfg: TeacherPassBenchConfig) -> tuple[Path, str, str]:
    """Shapes train shards and random teachers of cfg.size under root; (train dir, dual, single)."""
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark
    from mcad.pipeline.shapes.teacher_models import check_teacher_size, make_teachers

    check_teacher_size(cfg.size)  # an unknown size fails before any data is written
    synth = SynthConfig(train=cfg.samples, val=2, test=2, image_size=cfg.image_size,
                        shard_size=cfg.shard_size, seed=cfg.seed)
    summary = write_benchmark(synth, root / "data")
    dual, single = make_teachers(root / "teachers", [" ".join(summary["vocabulary"])],
                                      size=cfg.size, seed=cfg.seed)
    return root / "data" / "train", str(dual), str(single)


def _job(cfg: TeacherPassBenchConfig, data: Path, dual: str, single: str, out: Path, **kw):
    from mcad.jobs.teacher_pass import TeacherPassJob

    return TeacherPassJob(data=str(data), dual=dual, single=single, out=str(out),
                          pool_size=cfg.pool_size, topk=cfg.topk,
                          calibration_rows=cfg.calibration_rows, **kw)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_bare(cfg: TeacherPassBenchConfig, data: Path, dual: str, single: str, out: Path, *,
              progress: bool = True) -> dict:
    """The shard work of the pass in this process, without Ray; returns rows and seconds.

    W is random, not calibrated: its values change no operation (candidates
    come from the dual logits; W is one matmul either way), and the first
    shard then runs on cold kernels, as each Ray actor's first shard does.
    """
    import torch
    from tqdm import tqdm

    from mcad.jobs.teacher_pass_worker import process_shard
    from mcad.pipeline.shard_list import list_shards, shard_name
    from mcad.pipeline.teachers import load_teachers

    job = _job(cfg, data, dual, single, out)
    pass_cfg = job.pass_config()
    sources = list_shards(str(data))
    threads = os.cpu_count() or 1
    with _torch_threads(threads):
        t0 = time.perf_counter()
        dual_t, single_t = load_teachers(dual, single)
        projection = torch.randn(single_t.dim_fused, dual_t.dim,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        t1 = time.perf_counter()
        rows = 0
        for src in tqdm(sources, desc="bare loop", unit="shard", disable=not progress):
            rows += process_shard(dual_t, single_t, job, pass_cfg, projection,
                                  source=src, shard=shard_name(src))["rows"]
        t2 = time.perf_counter()
    return {"rows": rows, "seconds": t2 - t1, "load_seconds": t1 - t0, "threads": threads,
            "shards": len(sources)}


def shard_window(store: Path) -> float:
    """Seconds from the first shard's start to the last shard's end, from the finished store.

    process_shard times each shard itself (manifest `seconds`) and ends right
    after its signals file is written, so end = that file's mtime and
    start = end - seconds, whichever worker ran it (one machine, one clock).
    """
    from mcad.storage.manifest import Manifest, SECONDS, signals_path

    manifest = Manifest.load(store)
    ends = {name: signals_path(store, name).stat().st_mtime for name in manifest.shards}
    starts = [ends[name] - float(entry[SECONDS]) for name, entry in manifest.shards.items()]
    return max(ends.values()) - min(starts)


def time_ray(cfg: TeacherPassBenchConfig, data: Path, dual: str, single: str, out: Path, *,
             workers: int, ray_address: str | None, progress: bool = True) -> dict:
    """One teacher pass on the running cluster; its shard-phase and end-to-end timings."""
    from mcad.jobs.teacher_pass import run_teacher_pass

    summary = run_teacher_pass(_job(cfg, data, dual, single, out, workers=workers,
                                    ray_address=ray_address), progress=progress)
    return {"rows": summary["rows"], "seconds": shard_window(out),
            "end_to_end_seconds": summary["seconds"], "summary_samples_per_s": summary["samples_per_s"]}


def _figures(cfg: TeacherPassBenchConfig, bare: dict, ray_runs: dict[int, dict]) -> dict:
    figures = {"bare_samples_per_s": bare["rows"] / bare["seconds"], "bare_seconds": bare["seconds"],
               "bare_threads": bare["threads"], "bare_load_seconds": bare["load_seconds"]}
    for workers, run in ray_runs.items():
        name = RAY_RUNS[workers]
        figures[f"{name}_samples_per_s"] = run["rows"] / run["seconds"]
        figures[f"{name}_seconds"] = run["seconds"]
        figures[f"{name}_end_to_end_samples_per_s"] = run["summary_samples_per_s"]
        figures[f"{name}_end_to_end_seconds"] = run["end_to_end_seconds"]
    figures.update(samples=bare["rows"], shards=bare["shards"], pool_size=cfg.pool_size,
                   topk=cfg.topk, teacher_size=cfg.size)
    return figures


def run_teacher_pass_bench(cfg: TeacherPassBenchConfig, *, workdir: str | None = None,
                           ray_address: str | None = None, progress: bool = True) -> dict:
    """Build inputs, time bare / Ray 1 worker / Ray 2 workers, delete everything; the bench JSON dict."""
    from mcad.jobs.ray_cluster import ray_session

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mcad-bench-teacher-pass-", dir=workdir) as tmp:
        root = Path(tmp)
        data, dual, single = make_inputs(root, cfg)
        # Bare first, before Ray exists (unless a caller already started it): no daemons beside it.
        bare = time_bare(cfg, data, dual, single, root / "bare", progress=progress)
        with ray_session(ray_address) as cluster:  # one cluster for both runs; the job reuses it
            ray_runs = {w: time_ray(cfg, data, dual, single, root / f"ray{w}", workers=w,
                                    ray_address=ray_address, progress=progress) for w in RAY_RUNS}
            machine = machine_info(ray_cluster_cpus=cluster["resources"].get("CPU"))
    for workers, run in ray_runs.items():
        if run["rows"] != bare["rows"]:  # the ratios would compare different work
            raise RuntimeError(f"Ray with {workers} worker(s) wrote {run['rows']} rows, "
                               f"the bare loop {bare['rows']}")
    machine["load_average_at_start"] = list(load_at_start)
    machine["load_average_at_end"] = list(os.getloadavg())
    figures = _figures(cfg, bare, ray_runs)
    ratios = {"ray_over_bare": figures["ray_1_worker_samples_per_s"] / figures["bare_samples_per_s"],
              "two_workers_over_one": figures["ray_2_workers_samples_per_s"]
                                      / figures["ray_1_worker_samples_per_s"]}
    return {"bench": "teacher-pass", "ratios": ratios, "figures": figures, "machine": machine,
            "config": asdict(cfg), "covers": COVERS}


def format_table(result: dict) -> str:
    """A small human-readable table of one bench result."""
    f, r, c = result["figures"], result["ratios"], result["config"]
    lines = [f"teacher pass: {c['size']} teachers, {f['samples']} samples in {f['shards']} shards, "
             f"P={c['pool_size']} K={c['topk']}, {result['machine']['cpus']} CPUs",
             f"{'':<22}{'samples/s':>10}{'shard s':>10}{'end-to-end s':>14}",
             f"{'bare loop':<22}{f['bare_samples_per_s']:>10.2f}{f['bare_seconds']:>10.1f}{'':>14}"]
    for workers, name in RAY_RUNS.items():
        label = f"ray, {workers} worker{'s' if workers > 1 else ''}"
        lines.append(f"{label:<22}{f[name + '_samples_per_s']:>10.2f}{f[name + '_seconds']:>10.1f}"
                     f"{f[name + '_end_to_end_seconds']:>14.1f}")
    lines += [f"ray_over_bare          {r['ray_over_bare']:.3f}   (target >= 0.85)",
              f"two_workers_over_one   {r['two_workers_over_one']:.3f}"]
    return "\n".join(lines)
