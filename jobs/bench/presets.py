"""`mcad bench presets`: size, cost and speed of the student presets against the demo teachers.

One row per student preset (student.models.PRESETS, random weights, built on
the dual teacher's tokenizer and image processor) and per demo teacher
(pipeline/shapes/demo_teachers/dual and single, as shipped):

  params             sum(p.numel()) of the model as it is used: a student's exported
                     CLIPModel (the feature heads are dropped at export), the teacher as loaded
  flops_per_image    torch's FlopCounterMode count (2 per multiply-add, eager attention) of one
  flops_per_caption  image / one caption of the maximum length (student.models.model_cost);
                     for the single (BLIP-ITM) teacher a caption has no cost of its own: its text
                     runs once per image-text pair, so `flops_per_pair` is given instead
  images_per_s       encoding throughput on this CPU, batches of --batch (default 64) rendered
  captions_per_s     shapes images / real shapes captions, inputs prepared beforehand (processor
                     and tokenizer not timed), torch.inference_mode, --warmup untimed batches,
                     then the median of --batches timed ones; single: `pairs_per_s` (ITM passes
                     with the image states at hand) instead of captions
  latency_ms         text-to-image search in a gallery of --gallery (default 10,000) images whose
                     normalised embeddings are precomputed (random unit vectors: values change no
                     cost): per query, tokenize one caption, encode it, score it against the
                     gallery (matrix-vector) and torch.topk(10); median over --queries queries
                     after 5 untimed ones. Single: the dual teacher's query with its top-16 (the
                     evaluation's re-ranking depth), then the ITM head on those 16 pairs, the
                     gallery's BLIP image states assumed cached (their size is in the figures)

    mcad bench presets --json bench-presets.json
    mcad bench presets --presets smoke --gallery 1000 --queries 5 --batches 1

Ratios: <preset>_params_over_dual, <preset>_image_flops_over_dual,
<preset>_images_per_s_over_dual, <preset>_latency_over_dual. This module
imports nothing heavy (torch, pyarrow, Ray) at module level, so `mcad bench` reads its config's defaults at once
(its click command is in jobs/cli/bench.py).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad.jobs.bench.machine import machine_info
from mcad.pipeline.shapes import DEMO_TEACHERS

TOP = 10            # results returned per query
RERANK_K = 16       # pipeline.evaluate.DEFAULT_RERANK_K: the single teacher re-ranks the dual's top-16
QUERY_WARMUP = 5


@dataclass(frozen=True)
class PresetsBenchConfig:
    teachers: str = str(DEMO_TEACHERS)       # a folder with dual/ and single/
    presets: tuple[str, ...] = ()     # () = every preset in student.models.PRESETS
    batch: int = 64
    batches: int = 5                  # timed batches per direction (median)
    warmup: int = 2
    gallery: int = 10_000
    queries: int = 50
    threads: int = 0                  # torch threads while timing; 0: torch's default
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if min(self.batch, self.batches, self.gallery, self.queries) < 1 or self.warmup < 0 \
                or self.threads < 0:
            raise InputError("batch, batches, gallery and queries must be >= 1, "
                             "warmup and threads >= 0")
        if self.gallery < RERANK_K:
            raise InputError(f"gallery must hold at least {RERANK_K} images, got {self.gallery}")


def sample_inputs(n: int, image_size: int, seed: int) -> tuple[list, list[str]]:
    """n rendered shapes images and one real caption of each (the benchmark's own generator)."""
    import numpy as np

    from mcad.pipeline.shapes.world import captions, make_scene, render

    rng = np.random.default_rng(seed)
    images, texts = [], []
    for i in range(n):
        scene = make_scene(rng, image_size=image_size, n_objects=1 + i % 3)
        images.append(render(scene))
        texts.append(captions(scene, rng, 1)[0])
    return images, texts


def _median_rate(fn, items: int, *, warmup: int, repeats: int) -> float:
    """items per second of fn(), median over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times)


def _median_ms(fn, queries: list[str]) -> float:
    for q in queries[:QUERY_WARMUP]:
        fn(q)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _gallery(n: int, dim: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def _queries(cfg: PresetsBenchConfig) -> list[str]:
    _, texts = sample_inputs(cfg.queries + QUERY_WARMUP, 48, cfg.seed + 1)
    return texts


def clip_row(clip, processor, cfg: PresetsBenchConfig, *, kind: str, images: list, texts: list[str]) -> dict:
    """Parameters, FLOPs, throughput and 10k-gallery latency of one CLIPModel (student or dual teacher)."""
    import torch

    from mcad.student.models import clip_image_embeddings, clip_text_embeddings, model_cost

    clip = clip.float().eval()
    cost = model_cost(clip, processor)
    max_len = clip.config.text_config.max_position_embeddings
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tok = processor.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    dim = int(clip.config.projection_dim)
    gallery = _gallery(cfg.gallery, dim, cfg.seed)

    def query(text: str, k: int = TOP):
        t = processor.tokenizer([text], truncation=True, max_length=max_len, return_tensors="pt")
        q = clip_text_embeddings(clip, t["input_ids"], t["attention_mask"])
        return torch.topk(gallery @ q[0], k)

    with torch.inference_mode():
        img_rate = _median_rate(lambda: clip_image_embeddings(clip, pixels), len(images),
                                warmup=cfg.warmup, repeats=cfg.batches)
        txt_rate = _median_rate(lambda: clip_text_embeddings(clip, tok["input_ids"], tok["attention_mask"]),
                                len(texts), warmup=cfg.warmup, repeats=cfg.batches)
        latency = _median_ms(query, _queries(cfg))
    return {"kind": kind, "params": cost["params_total"], "params_vision": cost["params_vision"],
            "params_text": cost["params_text"], "dim": dim,
            "flops_per_image": cost["flops_per_image"], "flops_per_caption": cost["flops_per_caption"],
            "images_per_s": img_rate, "captions_per_s": txt_rate, "latency_ms": latency,
            "_query": query}


def single_row(single, dual_query, cfg: PresetsBenchConfig, *, images: list, texts: list[str]) -> dict:
    """The BLIP-ITM teacher: vision throughput, ITM pairs/s, and re-ranking latency on the dual's top-16."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mcad.pipeline.itm import itm_forward

    model = single.model.float().eval()
    params = sum(p.numel() for p in model.parameters())
    params_vision = sum(p.numel() for p in model.vision_model.parameters())
    pixels = single.processor(images=images, return_tensors="pt")["pixel_values"].float()
    tokens = single.tokenize(texts)

    probe = copy.deepcopy(model).eval()  # BLIP's attention is plain matmuls: FlopCounterMode counts it
    side = pixels.shape[-1]
    with torch.inference_mode():
        with FlopCounterMode(display=False) as image_counter:
            states1 = probe.vision_model(pixel_values=torch.zeros(1, 3, side, side)).last_hidden_state
        length = model.config.text_config.max_position_embeddings
        ids = torch.full((1, length), 1, dtype=torch.long)
        with FlopCounterMode(display=False) as pair_counter:
            itm_forward(probe, ids, torch.ones_like(ids), states1)

        states = model.vision_model(pixel_values=pixels).last_hidden_state
        img_rate = _median_rate(lambda: model.vision_model(pixel_values=pixels), len(images),
                                warmup=cfg.warmup, repeats=cfg.batches)
        pair_rate = _median_rate(lambda: single.match_tokens(states, tokens, batch_size=len(texts)),
                                 len(texts), warmup=cfg.warmup, repeats=cfg.batches)
        # Cached gallery image states of the 16 candidates: their values change no cost.
        cand = torch.randn(RERANK_K, *states.shape[1:], generator=torch.Generator().manual_seed(cfg.seed))

        def query(text: str):
            dual_query(text, RERANK_K)  # the dual teacher's candidates
            t = single.tokenize([text] * RERANK_K)
            _, itm = single.match_tokens(cand, t, batch_size=RERANK_K)
            return torch.topk(itm, TOP)

        latency = _median_ms(query, _queries(cfg))
    state_bytes = int(states.shape[1] * states.shape[2] * 4)
    return {"kind": "teacher", "params": params, "params_vision": params_vision,
            "params_text": params - params_vision, "dim": int(model.config.text_config.hidden_size),
            "flops_per_image": int(image_counter.get_total_flops()), "flops_per_caption": None,
            "flops_per_pair": int(pair_counter.get_total_flops()),
            "images_per_s": img_rate, "captions_per_s": None, "pairs_per_s": pair_rate,
            "latency_ms": latency,
            "latency_note": f"dual teacher query over the gallery, its top-{RERANK_K} re-ranked by the "
                            f"ITM head; needs the gallery's cached BLIP image states "
                            f"({state_bytes} bytes per image float32, "
                            f"{state_bytes * cfg.gallery / 2**20:.0f} MiB for {cfg.gallery} images)",
            "captions_note": "no caption embedding: the text runs once per image-text pair (pairs_per_s)"}


def run_presets_bench(cfg: PresetsBenchConfig) -> dict:
    """Every preset and both demo teachers; the bench JSON dict."""
    import torch

    from mcad.pipeline.teachers import DualTeacher, SingleTeacher, check_teacher_dirs
    from mcad.student.models import PRESETS, build_student, get_preset, image_size

    presets = list(cfg.presets) or list(PRESETS)
    for name in presets:
        get_preset(name)  # an unknown preset fails before any timing
    dual_dir, single_dir = Path(cfg.teachers) / "dual", Path(cfg.teachers) / "single"
    check_teacher_dirs(dual_dir, single_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads_before)
    load_at_start = os.getloadavg()
    try:
        dual = DualTeacher.load(dual_dir, device="cpu", dtype=torch.float32)
        single = SingleTeacher.load(single_dir, device="cpu", dtype=torch.float32)
        images, texts = sample_inputs(cfg.batch, image_size(dual.processor.image_processor), cfg.seed)
        rows: dict[str, dict] = {}
        for name in presets:
            student, processor = build_student(name, tokenizer_from=dual_dir, teacher_dim=dual.dim,
                                               seed=cfg.seed)
            rows[name] = clip_row(student.clip, processor, cfg, kind="student", images=images, texts=texts)
        rows["dual"] = clip_row(dual.model, dual.processor, cfg, kind="teacher", images=images, texts=texts)
        rows["single"] = single_row(single, rows["dual"]["_query"], cfg, images=images, texts=texts)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    for row in rows.values():
        row.pop("_query", None)
    d = rows["dual"]
    ratios = {}
    for name in presets:
        r = rows[name]
        ratios.update({f"{name}_params_over_dual": r["params"] / d["params"],
                       f"{name}_image_flops_over_dual": r["flops_per_image"] / d["flops_per_image"],
                       f"{name}_images_per_s_over_dual": r["images_per_s"] / d["images_per_s"],
                       f"{name}_latency_over_dual": r["latency_ms"] / d["latency_ms"]})
    machine = {**machine_info(), "torch_threads": threads, "load_average_at_start": list(load_at_start),
               "load_average_at_end": list(os.getloadavg())}
    # JSON files sort their keys: "models" keeps the table's row order.
    config = {**asdict(cfg), "presets": presets, "models": [*presets, "dual", "single"]}
    return {"bench": "presets", "ratios": ratios, "figures": rows, "machine": machine, "config": config}


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}{unit}".strip()
    return f"{n:.3g}{unit and ' ' + unit}"


def table_rows(result: dict) -> list[list[str]]:
    """Header and one row per model, as strings (the text table and report.md share them)."""
    c = result["config"]
    rows = [["model", "params", "MFLOPs / image", "MFLOPs / caption", "images/s", "captions/s",
             f"latency {c['gallery']:,} gallery (ms)"]]
    for name in c["models"]:
        r = result["figures"][name]
        caption_flops = (f"{r['flops_per_caption'] / 1e6:.1f}" if r["flops_per_caption"] is not None
                         else f"{r['flops_per_pair'] / 1e6:.1f} per pair")
        captions = (f"{r['captions_per_s']:.0f}" if r["captions_per_s"] is not None
                    else f"{r['pairs_per_s']:.0f} pairs/s")
        label = f"{r['kind']} {name}"
        if name == "single":
            label += f" (re-ranks dual top-{RERANK_K})"
        rows.append([label, _si(r["params"]), f"{r['flops_per_image'] / 1e6:.1f}", caption_flops,
                     f"{r['images_per_s']:.0f}", captions, f"{r['latency_ms']:.2f}"])
    return rows


def format_table(result: dict) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    m = result["machine"]
    lines = [f"presets against the demo teachers: batch {result['config']['batch']}, "
             f"{m['cpus']} CPUs, {m['torch_threads']} torch threads, load {m['load_average_at_start'][0]:.2f}"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)
