"""`mcad bench teacher-pass --profile`: where the teacher pass's time goes, per stage.

The pass's shard work (`process_shard`, no Ray) runs twice in this process on
the same data and teachers: with the single teacher's cross-attention cache
(the default path) and without it (each pair projects its image's keys and
values again). Each stage's seconds are exclusive (a stage's nested stages
are not counted twice), so the stages add up to the timed loop:

    read and decode   iterating the tar: reading, decoding and checking each sample
    preprocess        image processors and tokenizers of both teachers
    dual image        CLIP vision tower + projection
    dual text         CLIP text tower + projection
    single vision     BLIP vision tower (once per image)
    ITM pairs         BLIP text encoder with cross-attention + ITM head, every candidate pair
    signal maths      the rest of the shard's work: pools, products, top-K, fusion projection
    write             the signals and rejects Parquet files

FLOPs per sample come from the configs (pipeline/teacher_flops.py); achieved
FLOP/s = FLOPs per sample x samples / the stage's seconds, and MFU = achieved /
the device's dense peak for the teachers' dtype (jobs/bench/machine.PEAK_FLOPS,
or --peak-tflops; "n/a" where unknown, as for CPUs).

On CUDA (`--device cuda`) the teachers run as the pass runs them there:
bfloat16 (float16 without native bfloat16), SDPA attention where the model
has it, micro-batches sized to the free memory; the clock synchronises the
device at every stage boundary, so kernels are counted in the stage that
launched them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from mcad.jobs.bench.machine import machine_info, peak_flops
from mcad.storage.errors import InputError

STAGES = ("read_decode", "preprocess", "dual_image", "dual_text", "single_vision", "itm_pairs",
          "signal_maths", "write")
MODEL_STAGES = ("dual_image", "dual_text", "single_vision", "itm_pairs")
LABELS = {"read_decode": "read and decode", "preprocess": "preprocess", "dual_image": "dual image",
          "dual_text": "dual text", "single_vision": "single vision", "itm_pairs": "ITM pairs",
          "signal_maths": "signal maths", "write": "write"}

PROFILE_COVERS = {
    "stage_seconds": "exclusive wall seconds per stage over the whole bare loop (process_shard over "
                     "every shard, this process, torch on every core, teachers loaded beforehand, a "
                     "random W, after one untimed warm-up pass over the first shard); signal_maths is "
                     "process_shard's time outside every other stage",
    "total_seconds": "wall time of the bare loop; the stages sum to it up to the loop's own overhead",
    "stage_share": "stage seconds / the sum of all stages (cached run)",
    "flops_per_sample": "matrix-product FLOPs per kept sample and model stage, counted from the configs "
                        "(pipeline/teacher_flops.py); texts at the longest caption's token count",
    "flop_per_s": "flops_per_sample x samples / stage seconds",
    "samples_per_s_by_stage": "samples / the stage's seconds: the rate the pass would reach if only that stage ran",
    "mfu": "flop_per_s / the device's dense peak FLOP/s for the teachers' dtype (figures.device.peak_flop_per_s); "
           "null where the peak is unknown. Each run counts the FLOPs its own path does (uncached: every pair's "
           "key/value projection)",
    "pass_mfu": "the model stages' FLOPs per sample x samples / the whole loop's seconds / the peak",
    "itm_cached_over_uncached": "ITM pairs/s with the cross-attention cache over without it (same pairs)",
    "pass_cached_over_uncached": "samples/s of the whole loop with the cache over without it",
}


class StageClock:
    """Exclusive seconds per stage: time inside a nested stage counts only there.

    `sync` (torch.cuda.synchronize on CUDA) runs at every stage boundary, so work a
    stage queued on the device is timed in that stage, not in whichever waits for it.
    """

    def __init__(self, sync=None):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.pairs = 0  # ITM pairs scored
        self._stack: list[list] = []  # [stage, start, time spent in nested stages]
        self._sync = sync or (lambda: None)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            spent = time.perf_counter() - entry[1]
            self.seconds[name] += spent - entry[2]
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, name: str, fn):
        def timed(*args, **kw):
            with self.stage(name):
                return fn(*args, **kw)
        return timed

    def wrap_iter(self, name: str, it):
        """Time each next() of an iterator (the tar reader) as `name`."""
        it = iter(it)
        while True:
            with self.stage(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item


@contextlib.contextmanager
def instrumented(clock: StageClock, dual, single):
    """Time the pass's stages: the teachers' methods on these instances, the reader and writer modules."""
    import mcad.pipeline.shards as shards
    import mcad.storage.writer as writer

    patches = [(dual, "_pixels", "preprocess"), (dual, "_tokens", "preprocess"),
               (single, "_pixels", "preprocess"), (single, "_tokens", "preprocess"),
               (dual, "encode_images", "dual_image"), (dual, "encode_texts", "dual_text"),
               (single, "encode_images", "single_vision"), (single, "match_tokens", "itm_pairs")]
    for obj, attr, stage in patches:
        setattr(obj, attr, clock.wrap(stage, getattr(obj, attr)))
    match = single.match_tokens

    def counted(image_states, tokens, **kw):
        clock.pairs += int(tokens["input_ids"].shape[0])
        return match(image_states, tokens, **kw)

    single.match_tokens = counted
    read, write = shards.iter_shard, writer.write_shard
    shards.iter_shard = lambda *a, **kw: clock.wrap_iter("read_decode", read(*a, **kw))
    writer.write_shard = clock.wrap("write", write)
    try:
        yield
    finally:
        shards.iter_shard, writer.write_shard = read, write
        for obj, attr, _ in patches:
            delattr(obj, attr)  # back to the class's method


def profile_loop(cfg, data: Path, dual_t, single_t, out: Path, projection, *, cached: bool) -> dict:
    """The bare loop over every shard, stages timed; cached: the single teacher's cross-attention cache."""
    from mcad.jobs.bench.teacher_pass import _job
    from mcad.jobs.teacher_pass_worker import process_shard
    from mcad.pipeline.shard_list import list_shards, shard_name

    job = _job(cfg, data, str(dual_t.path), str(single_t.path), out)
    pass_cfg = job.pass_config()
    clock = StageClock(_synchronizer(dual_t.device))
    single_t.cross_kv_cache = cached
    rows = 0
    try:
        with instrumented(clock, dual_t, single_t):
            t0 = time.perf_counter()
            for src in list_shards(str(data)):
                with clock.stage("signal_maths"):
                    rows += process_shard(dual_t, single_t, job, pass_cfg, projection, source=src,
                                          shard=shard_name(src))["rows"]
            total = time.perf_counter() - t0
    finally:
        del single_t.cross_kv_cache  # back to the class default
    return {"rows": rows, "pairs": clock.pairs, "total_seconds": total, "stage_seconds": clock.seconds}


def _synchronizer(device):
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


DTYPES = ("bfloat16", "float16", "float32")


def check_device(device: str):
    """The torch device of `--device` ("cpu", "cuda", "cuda:N"); one line when there is no such device."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "for the CPU only"
            raise InputError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                             f"built {built})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def device_figures(teacher, peak: float | None) -> dict:
    """The device, dtype, attention and micro-batches the teachers ran with, and the peak MFU is taken against."""
    import torch

    dev = teacher.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    dtype = str(teacher.dtype).removeprefix("torch.")
    table = peak_flops(name, dtype)
    return {"type": dev.type, "name": name or "cpu", "dtype": dtype,
            "peak_flop_per_s": peak if peak is not None else table,
            "peak_source": "given" if peak is not None else ("table" if table is not None else "unknown"),
            "memory_bytes": torch.cuda.get_device_properties(dev).total_memory if name else None}


def _longest_tokens(teacher, texts) -> int:
    return int(teacher.processor.tokenizer(list(texts), padding=True, return_tensors="pt")["input_ids"].shape[1])


def _captions(data: Path) -> list[str]:
    from mcad.pipeline.shard_list import list_shards
    from mcad.pipeline.shards import Sample, iter_shard

    return [s.caption for src in list_shards(str(data)) for s in iter_shard(src) if isinstance(s, Sample)]


def _warm_up(cfg, data: Path, dual_t, single_t, out: Path, projection) -> None:
    """The first shard once, untimed, both ITM paths on its first pairs: first-call costs
    (allocations, kernel choices per shape) stay out of both timed loops."""
    from mcad.jobs.bench.teacher_pass import _job
    from mcad.jobs.teacher_pass_worker import process_shard
    from mcad.pipeline.shard_list import list_shards, shard_name

    job = _job(cfg, data, str(dual_t.path), str(single_t.path), out)
    first = list_shards(str(data))[0]
    process_shard(dual_t, single_t, job, job.pass_config(), projection, source=first, shard=shard_name(first))


def run_profile(cfg, *, device: str = "cpu", dtype: str | None = None, peak_flop_per_s: float | None = None,
                workdir: str | None = None, progress: bool = True) -> dict:
    """Build inputs, run the bare loop cached and uncached with stage clocks; the bench JSON dict.

    device: "cpu", "cuda" or "cuda:N"; dtype: the teachers' ("bfloat16", "float16", "float32";
    None: the pass's default for the device); peak_flop_per_s: the peak MFU is taken against
    (None: PEAK_FLOPS for the CUDA device, unknown on the CPU).
    """
    import torch

    from mcad.jobs.bench.teacher_pass import _torch_threads, make_inputs
    from mcad.pipeline.teacher_flops import stage_flops_per_sample
    from mcad.pipeline.teachers import load_teachers

    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    dev = check_device(device)
    if peak_flop_per_s is not None and not peak_flop_per_s > 0:
        raise InputError(f"the peak must be positive, got {peak_flop_per_s}")
    load_at_start = os.getloadavg()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mcad-bench-teacher-profile-", dir=workdir) as tmp, \
            _torch_threads(threads):
        root = Path(tmp)
        data, dual, single = make_inputs(root, cfg)
        dual_t, single_t = load_teachers(dual, single, device=dev,
                                         dtype=getattr(torch, dtype) if dtype else None)
        device_info = device_figures(dual_t, peak_flop_per_s)
        attention = {"dual": dual_t.attn_implementation, "single": single_t.attn_implementation}
        batches = {"dual": asdict(dual_t.batches), "single": asdict(single_t.batches)}
        projection = torch.randn(single_t.dim_fused, dual_t.dim, generator=torch.Generator().manual_seed(cfg.seed))
        captions = _captions(data)
        _warm_up(cfg, data, dual_t, single_t, root / "warm-up", projection)
        runs = {}
        for name, cached in (("uncached", False), ("cached", True)):
            if progress:
                print(f"profile: {name} pass ...", flush=True)
            runs[name] = profile_loop(cfg, data, dual_t, single_t, root / name, projection, cached=cached)
        tokens = {"dual": _longest_tokens(dual_t, captions), "single": _longest_tokens(single_t, captions)}
        configs = (dual_t.model.config, single_t.model.config)
    if runs["cached"]["rows"] != runs["uncached"]["rows"] or runs["cached"]["pairs"] != runs["uncached"]["pairs"]:
        raise RuntimeError("the cached and uncached loops did different work")
    rows, pairs = runs["cached"]["rows"], runs["cached"]["pairs"]
    flops = {name: stage_flops_per_sample(*configs, dual_tokens=tokens["dual"], single_tokens=tokens["single"],
                                          pairs_per_sample=pairs / rows, kv_images_per_sample=1.0,
                                          cached=name == "cached")
             for name in runs}
    figures = {"samples": rows, "pairs": pairs, "pairs_per_sample": pairs / rows, "teacher_size": cfg.size,
               "pool_size": cfg.pool_size, "topk": cfg.topk, "threads": threads, "text_tokens": tokens,
               "device": device_info, "attention": attention, "micro_batches": batches}
    peak = device_info["peak_flop_per_s"]
    for name, run in runs.items():
        sec = run["stage_seconds"]
        stage_sum = sum(sec.values())
        figures[name] = {
            "total_seconds": run["total_seconds"], "stage_sum_seconds": stage_sum,
            "samples_per_s": rows / run["total_seconds"], "itm_pairs_per_s": pairs / sec["itm_pairs"],
            "seconds_per_sample": {s: sec[s] / rows for s in STAGES},
            "stage_share": {s: sec[s] / stage_sum for s in STAGES},
            "flops_per_sample": flops[name],
            "flop_per_s": {s: flops[name][s] * rows / sec[s] for s in MODEL_STAGES if sec[s] > 0},
            "samples_per_s_by_stage": {s: rows / sec[s] for s in STAGES if sec[s] > 0},
        }
        figures[name]["mfu"] = {s: (rate / peak if peak else None) for s, rate in figures[name]["flop_per_s"].items()}
        figures[name]["pass_flop_per_s"] = sum(flops[name].values()) * rows / run["total_seconds"]
        figures[name]["pass_mfu"] = figures[name]["pass_flop_per_s"] / peak if peak else None
    figures["stage_share"] = figures["cached"]["stage_share"]
    figures["flops_per_sample"] = flops["cached"]
    figures["stage_sum_over_total"] = figures["cached"]["stage_sum_seconds"] / figures["cached"]["total_seconds"]
    ratios = {"itm_cached_over_uncached": figures["cached"]["itm_pairs_per_s"] / figures["uncached"]["itm_pairs_per_s"],
              "pass_cached_over_uncached": figures["cached"]["samples_per_s"] / figures["uncached"]["samples_per_s"]}
    machine = machine_info()
    machine["load_average_at_start"] = list(load_at_start)
    machine["load_average_at_end"] = list(os.getloadavg())
    return {"bench": "teacher-pass", "mode": "profile", "ratios": ratios, "figures": figures,
            "machine": machine, "config": asdict(cfg), "covers": PROFILE_COVERS}


def _mfu(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_profile(result: dict) -> str:
    f, r, c = result["figures"], result["ratios"], result["config"]
    d = f.get("device", {"name": "cpu", "dtype": "float32", "peak_flop_per_s": None, "peak_source": "unknown"})
    peak = d["peak_flop_per_s"]
    peak_text = f"peak {peak / 1e12:.1f} TFLOP/s ({d['peak_source']})" if peak else "peak unknown: MFU n/a"
    lines = [f"teacher pass profile: {c['size']} teachers, {f['samples']} samples, P={c['pool_size']} "
             f"K={c['topk']}, {f['pairs_per_sample']:.1f} ITM pairs per sample, {f['threads']} threads",
             f"device {d['name']}, {d['dtype']}, {peak_text}",
             f"{'stage':<16}{'s/sample':>10}{'share':>8}{'samples/s':>11}{'GFLOP/sample':>14}{'GFLOP/s':>10}"
             f"{'MFU':>7}{'uncached s/sample':>19}{'uncached MFU':>14}"]
    cached, uncached = f["cached"], f["uncached"]
    for s in STAGES:
        gf = cached["flops_per_sample"].get(s)
        rate = cached["flop_per_s"].get(s)
        per_s = cached.get("samples_per_s_by_stage", {}).get(s)
        model = s in cached.get("mfu", {})
        lines.append(f"{LABELS[s]:<16}{cached['seconds_per_sample'][s]:>10.4f}{cached['stage_share'][s]:>8.1%}"
                     f"{(f'{per_s:.1f}' if per_s is not None else ''):>11}"
                     f"{(f'{gf / 1e9:.3f}' if gf is not None else ''):>14}"
                     f"{(f'{rate / 1e9:.1f}' if rate is not None else ''):>10}"
                     f"{(_mfu(cached['mfu'][s]) if model else ''):>7}"
                     f"{uncached['seconds_per_sample'][s]:>19.4f}"
                     f"{(_mfu(uncached['mfu'].get(s)) if model else ''):>14}")
    lines += [f"stages sum to {f['stage_sum_over_total']:.1%} of the measured total "
              f"({cached['total_seconds']:.1f} s cached, {uncached['total_seconds']:.1f} s uncached)",
              f"samples/s: {cached['samples_per_s']:.2f} cached, {uncached['samples_per_s']:.2f} uncached"
              f" (whole-loop MFU {_mfu(cached.get('pass_mfu'))} cached, {_mfu(uncached.get('pass_mfu'))} uncached);"
              f" ITM pairs/s: {cached['itm_pairs_per_s']:.1f} cached, {uncached['itm_pairs_per_s']:.1f} uncached",
              f"itm_cached_over_uncached    {r['itm_cached_over_uncached']:.3f}   (target >= 2.5 at base size)",
              f"pass_cached_over_uncached   {r['pass_cached_over_uncached']:.3f}   (target >= 1.8 at base size)"]
    return "\n".join(lines)
