"""`mcad bench student`: what MCAD adds to a student's training step, and what the store saves.

Three variants of the same student step, measured in one run, on the same
student initialisation (same seed, rebuilt per variant) and the same batches
(replay: one whole pool per batch, the same pools in the same order):

  plain        contrastive only (w_dist = w_feat = 0)
  mcad_stored  MCAD from the signal store (alpha = beta = 1, all weights 1)
  mcad_online  MCAD with the teachers in the loop computing those signals per step

Without --store, a store is built in a temporary folder first: shapes data,
random teachers of --size, a teacher pass (P=64, K=16) on a local Ray cluster
started once and shut down before anything is timed. `WHAT_IS_TIMED` (also
written into the JSON) says exactly what each step's time covers.

    mcad bench student --json bench-student.json                 # demo teachers, preset s
    mcad bench student --store store/ --data data/train --teachers t/dual t/single --steps 5

Ratios: mcad_over_plain = mcad_stored / plain ms per step (target <= 1.10);
online_over_stored = mcad_online / mcad_stored (target >= 5). This module
imports nothing heavy (torch, pyarrow, Ray) at module level, so `mcad bench` reads its config's defaults at once
(its click command is in jobs/cli/bench.py).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad.jobs.bench.machine import machine_info

VARIANTS = ("plain", "mcad_stored", "mcad_online")
FIGURE = {v: f"{v}_ms_per_step" for v in VARIANTS}

WHAT_IS_TIMED = (
    "Per step, wall time (time.perf_counter) of: [mcad_online only] the teachers computing the "
    "pool's signals (pipeline.online.OnlineSignals: both teachers' preprocessing and forward "
    "passes, candidates, fusion projection); then, for all three, student.data.signal_tensors([pool]) "
    "(the signals half of collate: arrays to tensors, candidates as batch positions, as the "
    "training loop's collate does even for plain) and the training step: student.train.batch_loss "
    "(student forward, mcad_targets when w_dist or w_feat > 0, loss), zero_grad, backward, "
    "clip_grad_norm_(1.0), AdamW step. Not timed, for all three alike: reading the store and the "
    "tars, decoding samples, and the student's input encoding (image processor + tokenizer), "
    "prebuilt once per pool and shared. Replay, one whole pool per batch, the same pools in the "
    "same order; variants interleaved step by step (plain, stored, online for each pool) so "
    "machine-load drift hits them alike; warm-up steps untimed; median over the timed steps.")


@dataclass(frozen=True)
class StudentBenchConfig:
    """One bench run; the store-building fields apply only when no --store is given."""

    preset: str = "s"           # student size (student.models.PRESETS)
    steps: int = 20             # timed steps per variant
    warmup: int = 2             # untimed steps per variant first
    size: str = "demo"          # teacher size of a built store (pipeline.shapes.teacher_models.TEACHER_SIZES)
    samples: int = 512          # training samples of a built store
    pool_size: int = 64
    topk: int = 16
    calibration_rows: int = 256  # W only has to exist; its quality changes no timing
    threads: int = 0            # torch threads while timing; 0: torch's default
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if self.steps < 1 or self.warmup < 0 or self.threads < 0:
            raise InputError(f"steps must be >= 1, warmup and threads >= 0, got {self.steps}, "
                             f"{self.warmup}, {self.threads}")
        if self.topk > self.pool_size or self.samples < self.pool_size:
            raise InputError(f"need topk ({self.topk}) <= pool ({self.pool_size}) <= samples "
                             f"({self.samples})")


def variant_configs(seed: int) -> dict:
    """TrainConfig per variant: plain is contrastive only; both MCAD ones use every term."""
    from mcad.student.config import TrainConfig

    mcad = TrainConfig(alpha=1.0, beta=1.0, w_con=1.0, w_dist=1.0, w_feat=1.0, seed=seed)
    return {"plain": TrainConfig(alpha=1.0, beta=1.0, w_dist=0.0, w_feat=0.0, seed=seed),
            "mcad_stored": mcad, "mcad_online": mcad}


def build_store(root: Path, cfg: StudentBenchConfig, *, ray_address: str | None = None,
                progress: bool = True) -> tuple[Path, Path, tuple[str, str]]:
    """Shapes data, random teachers and a teacher pass under root; (store, train dir, teachers)."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark
    from mcad.pipeline.shapes.teacher_models import check_teacher_size, make_teachers

    check_teacher_size(cfg.size)  # an unknown size fails before any data is written
    # Two whole pools per shard: every pool is full, so every batch has the same size.
    synth = SynthConfig(train=cfg.samples, val=2, test=2, shard_size=2 * cfg.pool_size, seed=cfg.seed)
    summary = write_benchmark(synth, root / "data")
    dual, single = make_teachers(root / "teachers", [" ".join(summary["vocabulary"])],
                                      size=cfg.size, seed=cfg.seed)
    train = root / "data" / "train"
    run_teacher_pass(TeacherPassJob(data=str(train), dual=str(dual), single=str(single),
                                    out=str(root / "store"), pool_size=cfg.pool_size, topk=cfg.topk,
                                    calibration_rows=cfg.calibration_rows, ray_address=ray_address),
                     progress=progress)
    return root / "store", train, (str(dual), str(single))


def load_pools(store) -> list[dict]:
    """The store's pools joined with their samples, in store order; only the largest (full) ones,
    so every timed batch has the same size."""
    from mcad.pipeline.store_data import kept_samples
    from mcad.storage import schema
    from mcad.storage.data_join import iter_joined_pools
    from mcad.student.data import READ_COLUMNS

    pools = list(iter_joined_pools(store, kept_samples, shuffle=False, columns=READ_COLUMNS))
    size = max(len(p[schema.KEY]) for p in pools)
    return [p for p in pools if len(p[schema.KEY]) == size]


def encode_pools(pools: list[dict], processor) -> list[dict]:
    """The student's inputs of each pool (pixels, tokens): data loading, prebuilt and not timed."""
    from mcad.storage import schema
    from mcad.student.data import encode_samples

    return [encode_samples(p[schema.DATA], processor=processor) for p in pools]


class _Variant:
    """One variant's student, optimizer and signal source; `step` is the timed unit."""

    def __init__(self, name: str, train_cfg, *, preset: str, tokenizer_from: str, teacher_dim: int,
                 scale: float, online=None):
        import torch

        from mcad.student.models import build_student

        self.name, self.cfg, self.scale, self.online = name, train_cfg, scale, online
        self.student, self.processor = build_student(preset, tokenizer_from=tokenizer_from,
                                                     teacher_dim=teacher_dim, seed=train_cfg.seed)
        self.student.train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=train_cfg.lr,
                                           weight_decay=train_cfg.weight_decay)

    def step(self, pool: dict, inputs: dict) -> tuple[float, float]:
        """(seconds, loss) of one step on one pool: the training loop's body, minus its logging."""
        import torch

        from mcad.student.data import signal_tensors
        from mcad.student.train import batch_loss

        t0 = time.perf_counter()
        if self.online is not None:
            pool = self.online(pool)
        batch = {**inputs, **signal_tensors([pool])}
        loss, _ = batch_loss(self.cfg, self.student, batch, self.scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        return time.perf_counter() - t0, float(loss.detach())


def time_variants(cfg: StudentBenchConfig, store, teachers: tuple[str, str], *,
                  progress: bool = True) -> dict:
    """Median seconds per step of each variant, and each variant's first loss (a sanity check)."""
    import torch

    from mcad.pipeline.online import online_signals
    from mcad.student.data import teacher_logit_scale

    pools = load_pools(store)
    # Refuses teachers other than the store's: the online variant must compute the same signals.
    online = online_signals(store, *teachers)
    configs = variant_configs(cfg.seed)
    variants = [_Variant(name, configs[name], preset=cfg.preset, tokenizer_from=teachers[0],
                         teacher_dim=store.dims["d"], scale=teacher_logit_scale(store),
                         online=online if name == "mcad_online" else None) for name in VARIANTS]
    inputs = encode_pools(pools, variants[0].processor)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads_before)
    try:
        return _interleaved(cfg, variants, pools, inputs, progress=progress)
    finally:
        torch.set_num_threads(threads_before)


def _interleaved(cfg: StudentBenchConfig, variants: list, pools: list, inputs: list, *,
                 progress: bool) -> dict:
    import torch
    from tqdm import tqdm

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    first_loss: dict[str, float] = {}
    for i in tqdm(range(cfg.warmup + cfg.steps), desc="bench student", unit="step", file=sys.stderr,
                  disable=not progress):
        j = i % len(pools)  # replay the pools in order; every variant gets the same one
        for variant in variants:
            took, loss = variant.step(pools[j], inputs[j])
            first_loss.setdefault(variant.name, loss)
            if i >= cfg.warmup:
                seconds[variant.name].append(took)
    return {"median_s": {v: statistics.median(s) for v, s in seconds.items()}, "first_loss": first_loss,
            "step_ms": {v: [round(1000 * x, 3) for x in s] for v, s in seconds.items()},
            "batch_size": len(inputs[0]["input_ids"]), "pools": len(pools),
            "threads": torch.get_num_threads()}


def run_student_bench(cfg: StudentBenchConfig, *, store: str | None = None, data: str | None = None,
                      teachers: tuple[str, str] | None = None, workdir: str | None = None,
                      ray_address: str | None = None, progress: bool = True) -> dict:
    """Time the three variants on a given store (or one built and deleted here); the bench JSON dict."""
    from mcad.pipeline.store_data import check_data_matches
    from mcad.storage.errors import InputError
    from mcad.storage.reader import open_store

    if store is None and (data or teachers):
        raise InputError("data and teachers go with store (without it the bench builds its own)")
    if store is not None and not data:
        raise InputError("store needs data, the shards the store was made from")
    given_store, load_at_start = store, os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mcad-bench-student-", dir=workdir) as tmp:
        if store is None:
            # The teacher pass starts (and shuts down) its own local Ray: nothing of Ray runs while timing.
            store, data, teachers = build_store(Path(tmp), cfg, ray_address=ray_address, progress=progress)
        opened = open_store(store)
        check_data_matches(opened, str(data))
        if teachers is None:
            teachers = tuple(opened.manifest.teachers.get(r, {}).get("path") for r in ("dual", "single"))
        timed = time_variants(cfg, opened, tuple(map(str, teachers)), progress=progress)
    ms = {v: 1000 * s for v, s in timed["median_s"].items()}
    figures = {"plain_ms_per_step": ms["plain"], "mcad_stored_ms_per_step": ms["mcad_stored"],
               "mcad_online_ms_per_step": ms["mcad_online"], "batch_size": timed["batch_size"],
               "steps": cfg.steps, "warmup_steps": cfg.warmup, "pools": timed["pools"],
               "pool_size": opened.pool_size, "topk": opened.dims["k"], "teacher_dim": opened.dims["d"],
               "what_is_timed": WHAT_IS_TIMED}
    ratios = {"mcad_over_plain": ms["mcad_stored"] / ms["plain"],
              "online_over_stored": ms["mcad_online"] / ms["mcad_stored"]}
    machine = {**machine_info(), "torch_threads": timed["threads"], "load_average_at_start": list(load_at_start),
               "load_average_at_end": list(os.getloadavg())}
    # Same student, same batch, same signals (float16 stored, float32 online): the two MCAD
    # variants' first losses agree closely; plain's differs (it has no teacher terms).
    # step_ms: every timed step of each variant, in order, to judge the noise behind the medians.
    checks = {"first_loss": timed["first_loss"], "step_ms": timed["step_ms"]}
    config = {**asdict(cfg), "store": given_store, "teachers": list(teachers) if given_store else None}
    return {"bench": "student", "ratios": ratios, "figures": figures, "machine": machine, "checks": checks,
            "config": config}


def format_table(result: dict) -> str:
    """A small human-readable table of one bench result."""
    f, r, m = result["figures"], result["ratios"], result["machine"]
    lines = [f"student step: preset {result['config']['preset']}, batch {f['batch_size']} (one pool, "
             f"K={f['topk']}), median of {f['steps']} steps, {m['cpus']} CPUs, "
             f"{m['torch_threads']} torch threads, load {m['load_average_at_start'][0]:.2f}",
             f"{'':<30}{'ms/step':>10}"]
    for name, label in (("plain", "plain (contrastive only)"), ("mcad_stored", "MCAD, stored signals"),
                        ("mcad_online", "MCAD, teachers online")):
        lines.append(f"{label:<30}{f[FIGURE[name]]:>10.1f}")
    lines += [f"mcad_over_plain      {r['mcad_over_plain']:.3f}   (target <= 1.10)",
              f"online_over_stored   {r['online_over_stored']:.2f}    (target >= 5)"]
    return "\n".join(lines)
