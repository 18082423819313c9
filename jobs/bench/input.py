"""`mcad bench input`: what feeding the models costs, and what overlapping it with compute gains.

Measured in one run on photo-like shards (`mcad data synth --texture photo`:
640 x 480 JPEGs of 40-120 KB at the default --image-size 480), the given
teachers (default: the shipped demo teachers) and a store that a real teacher
pass (P = --pool, K = --topk, on a local Ray cluster started once and shut down
before anything is timed) writes from them:

  per-worker input rates   samples/s of one process on one core (torch 1 thread):
                           student path: read the tar, decode (draft and full), the student's
                           image processor, the tokenizer, collate (student.loader.build_batch);
                           pass path: read, decode in full, both teachers' image processors.
                           At the models' own sizes (the student's and the teachers' processors)
                           and at the real sizes (CLIP 224 px for the student and the dual
                           teacher, BLIP 384 px), pools of --pool samples (jobs/bench/input_rates.py).
  decode options           JPEG draft mode (the student's margin of 2, and 1) and the tensor path
                           of --decode gpu (student.loader.tensor_pixels: torch bicubic
                           antialiased resize, crop, normalise; here on the CPU) against the
                           processor's PIL path (jobs/bench/input_decode.py):
                           ms per image, pixel difference, and the cosine of the dual teacher's
                           image embeddings (bound: input_decode.DRAFT_BOUND; a quality-95 re-encode for scale).
                           torchvision.io.decode_jpeg on CUDA where CUDA and torchvision exist.
  student epochs           the same student (--preset, same seed) trained for --epochs epochs
                           from the store with 0 and 2 loader workers (and the default, when it
                           is neither), epochs interleaved; samples/s per epoch and the share
                           of the wall time the loop waited for its next batch.
  pass                     student-free: process_shard over every shard, serial (prefetch 0)
                           against the next pool prepared in a background thread (prefetch 1),
                           shards interleaved, the actor's threads (every core), byte-identical
                           files checked.

Ratios: loader_2_over_0 (student samples/s, 2 loader workers over inline; target >= 1.3),
pass_prefetch_over_serial (target >= 1.25). Figures include data_wait_share with the default
loader workers (target <= 0.10) and `gpu_host`: what the per-core input rates imply for a GPU
host of --host-cores cores against the real-size rates (computed, not measured). This module
imports nothing heavy at module level, so `mcad bench input --help` answers at once.

    mcad bench input --json bench-input.json
    mcad bench input --samples 64 --image-size 96 --pool 16 --topk 4 --epochs 1   a quick look
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad.jobs.bench.input_decode import decode_options
from mcad.jobs.bench.input_rates import encoded_samples, per_worker_rates, rate
from mcad.jobs.bench.machine import machine_info, peak_flops
from mcad.pipeline.shapes import DEMO_TEACHERS

TARGETS = {"loader_2_over_0": ">= 1.3", "pass_prefetch_over_serial": ">= 1.25", "data_wait_share": "<= 0.10"}
# The GPU host of the issue: one H200 at 50 % MFU, the real-size rates it implies (computed).
H200_PEAK, MFU = peak_flops("NVIDIA H200", "bfloat16"), 0.5


@dataclass(frozen=True)
class InputBenchConfig:
    teachers: str = str(DEMO_TEACHERS)  # a folder with dual/ and single/
    samples: int = 1024         # photo-like training samples
    image_size: int = 480       # their height (width 4/3 of it)
    shard_size: int = 256
    pool_size: int = 64
    topk: int = 16
    calibration_rows: int = 256
    preset: str = "s"           # the student
    epochs: int = 3             # timed student epochs per loader variant
    per_worker: int = 256       # samples timed for each per-worker input rate
    host_cores: int = 16        # the GPU host the rates are scaled to
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if min(self.samples, self.epochs, self.per_worker, self.host_cores, self.pool_size, self.topk) < 1:
            raise InputError("samples, epochs, per_worker, host_cores, pool and topk must be >= 1")
        if self.topk > self.pool_size or self.pool_size > self.samples:
            raise InputError(f"need topk ({self.topk}) <= pool ({self.pool_size}) <= samples ({self.samples})")


# ------------------------------------------------------------------ data and store


def build_data(root: Path, cfg: InputBenchConfig) -> Path:
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark

    write_benchmark(SynthConfig(train=cfg.samples, val=2, test=2, image_size=cfg.image_size,
                                shard_size=cfg.shard_size, seed=cfg.seed, texture="photo"), root / "data")
    return root / "data" / "train"


def build_store(root: Path, train: Path, cfg: InputBenchConfig, *, ray_address: str | None,
                progress: bool) -> Path:
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    teachers = Path(cfg.teachers)
    run_teacher_pass(TeacherPassJob(data=str(train), dual=str(teachers / "dual"), single=str(teachers / "single"),
                                    out=str(root / "store"), pool_size=cfg.pool_size, topk=cfg.topk,
                                    calibration_rows=min(cfg.calibration_rows, cfg.samples), ray_address=ray_address),
                     progress=progress)
    return root / "store"


# ------------------------------------------------------------------ student epochs


def student_epochs(cfg: InputBenchConfig, store, processor_dir: str, variants: dict[str, int], *,
                   progress: bool) -> dict:
    """Per variant (name -> loader workers): seconds, samples and batch-wait seconds of each epoch."""
    import torch
    from tqdm import tqdm

    from mcad.jobs.train_student import StudentJob, loader
    from mcad.student.config import TrainConfig
    from mcad.student.data import INPUT_IDS, teacher_logit_scale
    from mcad.student.models import build_student
    from mcad.student.train import batch_loss

    train_cfg = TrainConfig(seed=cfg.seed)
    scale = teacher_logit_scale(store)
    runs = {}
    for name, workers in variants.items():
        student, processor = build_student(cfg.preset, tokenizer_from=processor_dir, teacher_dim=store.dims["d"],
                                           seed=cfg.seed)
        student.train()
        job = StudentJob(store=str(store.path), data="", out="", train=train_cfg, loader_workers=workers)
        runs[name] = dict(student=student, optimizer=torch.optim.AdamW(student.parameters(), lr=train_cfg.lr),
                          batches=loader(job, store, processor, crop=None, workers=workers), epochs=[])
    bar = tqdm(total=cfg.epochs * len(runs), desc="bench input: student epochs", unit="epoch", file=sys.stderr,
               disable=not progress)
    for epoch in range(cfg.epochs):  # interleaved: load drift hits every variant alike
        for name, run in runs.items():
            seen = waited = 0.0
            t0 = time.perf_counter()
            batches = iter(run["batches"](epoch))
            while True:
                w0 = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - w0
                if batch is None:
                    break
                loss, _ = batch_loss(train_cfg, run["student"], batch, scale)
                run["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run["student"].parameters(), 1.0)
                run["optimizer"].step()
                seen += len(batch[INPUT_IDS])
            run["epochs"].append({"seconds": time.perf_counter() - t0, "samples": seen, "wait_seconds": waited})
            bar.update(1)
    bar.close()
    return {name: run["epochs"] for name, run in runs.items()}


def _summary(epochs: list[dict]) -> dict:
    seconds = sum(e["seconds"] for e in epochs)
    return {"samples_per_s": rate(sum(e["samples"] for e in epochs), seconds),
            "data_wait_share": sum(e["wait_seconds"] for e in epochs) / seconds if seconds else 0.0,
            "epochs": epochs}


# ------------------------------------------------------------------ pass


def pass_serial_and_prefetch(cfg: InputBenchConfig, store, train: Path, root: Path, *, dual, single,
                             progress: bool) -> dict:
    """process_shard over every shard serial and with the next pool prepared ahead, shards interleaved,
    with the loaded teachers `dual` and `single` (those of cfg.teachers)."""
    import torch
    from tqdm import tqdm

    from mcad.jobs.teacher_pass import TeacherPassJob
    from mcad.jobs.teacher_pass_worker import process_shard
    from mcad.pipeline.shard_list import list_shards, shard_name
    from mcad.pipeline.projection import load_projection
    from mcad.storage.manifest import FUSION_PROJ_NAME, REJECTS_SHA256, SIGNALS_SHA256

    teachers = Path(cfg.teachers)
    projection = load_projection(Path(store.path) / FUSION_PROJ_NAME)
    threads = torch.get_num_threads()  # an actor's: the node's CPUs over one worker
    # (name, prefetch, torch threads): the serial pass, the default prefetch, and prefetch with one torch
    # thread fewer (that core left to the read-ahead thread; informative).
    variants = [("serial", 0, threads), ("prefetch", 1, threads)]
    if threads > 1:
        variants.append(("prefetch_fewer_threads", 1, threads - 1))
    seconds = {name: 0.0 for name, _, _ in variants}
    identical, rows = True, 0
    sources = list_shards(str(train))
    bar = tqdm(total=len(variants) * len(sources), desc="bench input: pass", unit="shard", file=sys.stderr,
               disable=not progress)
    try:
        for source in sources:
            digests = set()
            for name, prefetch, n_threads in variants:  # interleaved shard by shard
                torch.set_num_threads(n_threads)
                job = TeacherPassJob(data=str(train), dual=str(teachers / "dual"), single=str(teachers / "single"),
                                     out=str(root / f"pass_{name}"), pool_size=cfg.pool_size, topk=cfg.topk)
                t0 = time.perf_counter()
                info = process_shard(dual, single, job, job.pass_config(), projection, source=source,
                                     shard=shard_name(source), prefetch=prefetch)
                seconds[name] += time.perf_counter() - t0
                digests.add((info[SIGNALS_SHA256], info[REJECTS_SHA256]))
                bar.update(1)
            identical &= len(digests) == 1
            rows += info["rows"]
    finally:
        torch.set_num_threads(threads)
        bar.close()
    out = {"rows": rows, "files_identical": identical, "torch_threads": threads}
    for name, _, n_threads in variants:
        out[f"{name}_seconds"] = seconds[name]
        out[f"{name}_samples_per_s"] = rate(rows, seconds[name])
        out[f"{name}_torch_threads"] = n_threads
    return out


# ------------------------------------------------------------------ GPU host arithmetic


def gpu_host(rates: dict, cores: int) -> dict:
    """What `cores` cores of input give against the real-size rates (computed, not measured): the
    teacher pass (teacher_flops.roofline, one H200 at 50 % MFU, P 64, K 16, cached) and a CLIP
    ViT-B/16-sized student fine-tune (3 x its forward FLOPs per sample, 32-token captions, same MFU)."""
    from mcad.pipeline.teacher_flops import clip_image_flops, clip_text_flops, registry_configs, roofline

    dual, _ = registry_configs("base")
    student_flops = 3 * (clip_image_flops(dual) + clip_text_flops(dual, 32))
    needs = {"teacher_pass_base": roofline("base", peak_flops=H200_PEAK, mfu=MFU)["cached"]["samples_per_s"],
             "teacher_pass_large": roofline("large", peak_flops=H200_PEAK, mfu=MFU)["cached"]["samples_per_s"],
             "student_clip_b16": MFU * H200_PEAK / student_flops}
    pass_rate, student_rate = rates["pass_real"] * cores, rates["student_real_draft"] * cores
    out = {"cores": cores, "computed_not_measured": True,
           "input_samples_per_s": {"pass_real": pass_rate, "student_real_draft": student_rate,
                                   "student_real_full": rates["student_real_full"] * cores},
           "needed_samples_per_s": needs,
           "cover": {"teacher_pass_base": pass_rate / needs["teacher_pass_base"],
                     "teacher_pass_large": pass_rate / needs["teacher_pass_large"],
                     "student_clip_b16": student_rate / needs["student_clip_b16"]}}
    out["gpu_decode_needed"] = {k: v < 1.0 for k, v in out["cover"].items()}
    return out


# ------------------------------------------------------------------ the run


def run_input_bench(cfg: InputBenchConfig, *, workdir: str | None = None, ray_address: str | None = None,
                    progress: bool = True) -> dict:
    """The whole bench (module doc) in a temporary folder; the bench JSON dict."""
    import torch

    from mcad.jobs.train_student import StudentJob, auto_loader_workers
    from mcad.pipeline.teachers import load_teachers
    from mcad.storage.reader import open_store
    from mcad.student.models import get_preset

    get_preset(cfg.preset)
    teachers = Path(cfg.teachers)
    load_at_start = os.getloadavg()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="mcad-bench-input-", dir=workdir) as tmp:
        root = Path(tmp)
        train = build_data(root, cfg)
        store = open_store(build_store(root, train, cfg, ray_address=ray_address, progress=progress))
        store.verify_files()
        dual_dir, single_dir = teachers / "dual", teachers / "single"
        samples, read_s = encoded_samples(train, cfg.per_worker)
        mean_bytes = sum(len(s.data) for s in samples) / len(samples)
        torch.set_num_threads(1)  # one worker, one core
        try:
            dual, single = load_teachers(dual_dir, single_dir)
            # The student's processor is the dual teacher's (its tokenizer and image processor).
            rates = per_worker_rates(samples, read_s, student_processor=dual.processor,
                                     dual_processor=dual.processor, single_processor=single.processor,
                                     pool=cfg.pool_size)
            options = decode_options(samples, dual=dual, pool=cfg.pool_size)
        finally:
            torch.set_num_threads(threads)
        default = auto_loader_workers(StudentJob(store="", data="", out=""))
        variants = {"workers_0": 0, "workers_1": 1, "workers_2": 2}
        if default not in (0, 1, 2):
            variants[f"workers_{default}"] = default
        epochs = {name: _summary(e) for name, e in student_epochs(cfg, store, str(dual_dir), variants,
                                                                  progress=progress).items()}
        passes = pass_serial_and_prefetch(cfg, store, train, root, dual=dual, single=single, progress=progress)
    wait = epochs[f"workers_{default}"]["data_wait_share"]
    ratios = {"loader_2_over_0": epochs["workers_2"]["samples_per_s"] / epochs["workers_0"]["samples_per_s"],
              "pass_prefetch_over_serial": passes["prefetch_samples_per_s"] / passes["serial_samples_per_s"]}
    figures = {"input_samples_per_s_per_worker": rates, "decode_options": options,
               "student": {name: {k: v for k, v in e.items() if k != "epochs"} for name, e in epochs.items()},
               "default_loader_workers": default, "data_wait_share": wait, "pass": passes,
               "gpu_host": gpu_host(rates, cfg.host_cores), "targets": TARGETS,
               "photo": {"width": cfg.image_size * 4 // 3, "height": cfg.image_size,
                         "mean_jpeg_bytes": mean_bytes}}
    machine = {**machine_info(), "load_average_at_start": list(load_at_start),
               "load_average_at_end": list(os.getloadavg())}
    checks = {"pass_files_identical": passes["files_identical"],
              "student_epochs": {name: e["epochs"] for name, e in epochs.items()}}
    return {"bench": "input", "ratios": ratios, "figures": figures, "machine": machine, "checks": checks,
            "config": asdict(cfg)}


def format_table(result: dict) -> str:
    f, r, m, c = result["figures"], result["ratios"], result["machine"], result["config"]
    rates, opt, host = f["input_samples_per_s_per_worker"], f["decode_options"], f["gpu_host"]
    lines = [f"input path: {c['samples']} photo-like samples ({f['photo']['width']}x{f['photo']['height']}, "
             f"mean {f['photo']['mean_jpeg_bytes'] / 1000:.0f} KB), preset {c['preset']}, pool {c['pool_size']}, "
             f"{m['cpus']} CPUs, load {m['load_average_at_start'][0]:.2f} -> {m['load_average_at_end'][0]:.2f}",
             "input samples/s per worker (one core):"]
    for name, value in rates.items():
        lines.append(f"  {name:<26}{value:>10.1f}")
    lines.append(f"decode options at {opt['side']} px (dual teacher, {opt['images']} images; draft margin "
                 f"{opt['draft_margin']}):")
    for name in ("pil_full", "pil_draft", "pil_draft_1x", "tensor_full", "reencode_q95"):
        extra = "" if name == "pil_full" else (f"  cosine mean {opt[f'{name}_cosine_mean']:.5f} min "
                                               f"{opt[f'{name}_cosine_min']:.5f}, pixels {opt[f'{name}_pixel_mean_abs']:.4f}")
        lines.append(f"  {name:<14}{opt[f'{name}_ms_per_image']:>7.2f} ms/image{extra}")
    lines.append(f"  draft within the bound (min cosine >= {opt['bound_min_cosine']}): {opt['draft_within_bound']} "
                 f"(margin 1: {opt['draft_1x_within_bound']}); GPU decode: {opt['gpu_decode']}")
    for name, s in f["student"].items():
        lines.append(f"student {name:<10}{s['samples_per_s']:>9.1f} samples/s, waiting {s['data_wait_share']:.1%}")
    p = f["pass"]
    fewer = (f", prefetch with {p['prefetch_fewer_threads_torch_threads']} torch threads "
             f"{p['prefetch_fewer_threads_samples_per_s']:.1f}" if "prefetch_fewer_threads_seconds" in p else "")
    lines += [f"pass serial {p['serial_samples_per_s']:.1f}, prefetch {p['prefetch_samples_per_s']:.1f}{fewer} "
              f"samples/s ({p['torch_threads']} torch threads; files identical: {p['files_identical']})",
              f"loader_2_over_0            {r['loader_2_over_0']:.3f}   (target {TARGETS['loader_2_over_0']})",
              f"pass_prefetch_over_serial  {r['pass_prefetch_over_serial']:.3f}   "
              f"(target {TARGETS['pass_prefetch_over_serial']})",
              f"data_wait_share            {f['data_wait_share']:.3f}   (default {f['default_loader_workers']} "
              f"workers; target {TARGETS['data_wait_share']})",
              f"GPU host, {host['cores']} cores (computed): cover {', '.join(f'{k} {v:.2f}' for k, v in host['cover'].items())}"]
    return "\n".join(lines)
