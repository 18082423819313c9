"""`mcad pipeline train-student`: a student from the signal store (or teachers online).

This module wires the pieces: the store's joined reader walks each shard's
tar beside its Parquet file (pipeline.store_data gives the kept samples), signals
come from the store or from the teachers in the loop (pipeline.online),
student/data.py batches and collates, student/train.py trains, student/models.py exports.

    mcad pipeline train-student --store store/ --data data/shapes/train --out runs/mcad

Input path (docs/design.md, section 1, "The input path"): batches are built by
`--loader-workers` processes (student/loader.py: a torch DataLoader; the same
batches whatever their number), images decoded in JPEG draft mode at the
student's size unless `--decode full`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from mcad.storage.atomic import atomic_write_json
from mcad.storage.errors import InputError
from mcad.student.config import TrainConfig

CONFIG_NAME, FINGERPRINT_NAME, MODEL_DIR = "train_config.json", "store_fingerprint.json", "model"
# How the student decodes its images: draft, a JPEG at the smallest DCT scale (1, 1/2, 1/4, 1/8) that
# still covers DRAFT_MARGIN times the student's input side; full, every pixel, as the teacher pass
# decodes. With the margin of 2 the processor still downsamples at least 2x with its own filter: on
# photo-like shards the demo dual teacher's image embeddings kept a cosine >= 0.9998 to the full decode's
# (the bound is 0.9995; a margin of 1 fell to 0.997; `mcad bench input`, docs/design.md section 1).
DECODES = ("draft", "full", "gpu")  # gpu: torchvision.io.decode_jpeg on the CUDA device (student/loader.py)
DRAFT_MARGIN = 2
AUTO = -1  # loader_workers: chosen from the CPUs this process may use (auto_loader_workers)
AUTO_LOADER_MAX = 8


@dataclass(frozen=True)
class StudentJob:
    store: str
    data: str
    out: str
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = "s"
    init: str | None = None
    tokenizer_from: str | None = None     # default: the store's dual teacher
    val_data: str | None = None
    online_teachers: tuple[str, str] | None = None
    resume: bool = False
    workers: int = 1                      # > 1: data parallel on Ray Train
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0           # torch threads per Ray Train worker (each holds <= 1 CPU); 0: 1
    ray_address: str | None = None        # an existing cluster; None: a local one when workers > 1
    stall_timeout_s: float = 600.0        # Ray Train: fail when the workers cannot be placed for this long
    verify_data: bool = False             # hash each tar as it streams; refuse one the pass read otherwise
    report_to: tuple[str, ...] = ()       # ("tensorboard",): rank 0 also writes RUN/tensorboard/
    hparams: dict | None = None           # written with the tensorboard run (a sweep's grid point)
    # Processes that read, decode and collate batches (per rank): 0 builds them in the training
    # process; -1 (auto): one per CPU this process may use but one (the training's), up to 8.
    loader_workers: int = AUTO
    decode: str = "draft"                 # DECODES

    def __post_init__(self):
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        if self.loader_workers < AUTO:
            raise InputError(f"loader_workers must be >= 0 (or -1: auto), got {self.loader_workers}")
        if self.decode not in DECODES:
            raise InputError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.online_teachers and self.loader_workers > 0:
            raise InputError("--loader-workers: with --online-teachers the teachers run in the training "
                             "process on every pool; use --loader-workers 0")
        if self.stall_timeout_s <= 0:
            raise InputError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.gpus_per_worker < 0:
            raise InputError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        from mcad.student.tensorboard import check_names

        check_names(self.report_to)


def run_train_student(job: StudentJob, *, progress: bool = True,
                      on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one student; return {"run", "model", "record"}.

    One process by default; with `workers > 1` or a `ray_address`, data
    parallel on Ray Train (see `_train_on_ray`). The checks and the run folder
    are done here, in the driver, before any worker starts.
    """
    from mcad.pipeline.store_data import check_data_matches, verified_samples
    from mcad.storage.reader import open_store
    from mcad.student.tensorboard import require

    require(job.report_to)  # a missing tensorboard package: one line, before anything runs
    store = open_store(job.store)
    store.verify_files()  # every file against its manifest sha256, once (fit reuses this Store)
    view_crop(store, job.train)  # a view recipe this environment cannot remake: refused before anything runs
    check_data_matches(store, job.data)
    if job.verify_data:
        verified_samples(store)  # a store without input digests is refused before the run starts
    dual_dir = job.tokenizer_from or store.manifest.teachers.get("dual", {}).get("path")
    if not dual_dir or not Path(dual_dir).is_dir():
        raise InputError(f"no tokenizer: the store's dual teacher {dual_dir!r} is not here; "
                         f"pass --tokenizer-from a CLIP directory")
    job = dataclasses.replace(job, tokenizer_from=str(dual_dir))
    _prepare_run(job, Path(job.out), store)
    if job.workers > 1 or job.ray_address:
        record = _train_on_ray(job, progress=progress, store=store)
    else:
        record = fit(job, store=store, progress=progress, on_epoch=on_epoch)
    return {"run": job.out, "model": str(Path(job.out) / MODEL_DIR), "record": record}


def fit(job: StudentJob, *, store=None, rank: int = 0, world_size: int = 1, device="cpu", progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """The training itself, in this process (one rank of `world_size`); rank 0 exports the model."""
    from mcad.pipeline.online import online_signals
    from mcad.pipeline.store_data import kept_samples, verified_samples
    from mcad.storage.reader import fingerprint_digest, open_store
    from mcad.student.data import steps_per_epoch, student_batches, teacher_logit_scale
    from mcad.student.models import build_student, export_hf
    from mcad.student.train import train

    store = store or open_store(job.store)  # Ray Train ranks open it themselves
    run = Path(job.out)
    student, processor = build_student(None if job.init else job.preset, tokenizer_from=job.tokenizer_from,
                                       teacher_dim=store.dims["d"], init=job.init, seed=job.train.seed)
    crop = view_crop(store, job.train)
    loader_workers = auto_loader_workers(job)
    if job.online_teachers:  # the teachers see every pool's images in this process: decoded here
        signals = online_signals(store, *job.online_teachers)
        samples = verified_samples(store) if job.verify_data else kept_samples

        def batches(epoch: int):
            return student_batches(store, job.train, processor, samples=samples, epoch=epoch, signals=signals,
                                   crop=crop, rank=rank, world_size=world_size)
    else:
        gpu = check_gpu_decode(job, device, crop) if job.decode == "gpu" else None
        batches = loader(job, store, processor, crop=crop, workers=loader_workers, rank=rank,
                         world_size=world_size, pin_memory=torch_device_type(device) == "cuda", gpu_device=gpu)
    record = train(job.train, student=student, batches=batches,
                   steps_per_epoch=steps_per_epoch(store, job.train, world_size),
                   teacher_logit_scale=teacher_logit_scale(store), run=run,
                   validate=_validator(job.val_data, processor), resume=job.resume, progress=progress,
                   device=device, on_epoch=on_epoch, report_to=job.report_to, hparams=job.hparams)
    getattr(batches, "close", lambda: None)()  # the loader's worker processes
    if rank == 0:
        export_hf(student.cpu(), processor, run / MODEL_DIR,
                  extra={"train": dataclasses.asdict(job.train), "preset": job.preset, "workers": world_size,
                         "loader_workers": loader_workers, "decode": job.decode,
                         "store": fingerprint_digest(store.fingerprint())})
    return record


def loader(job: StudentJob, store, processor, *, crop, workers: int, rank: int = 0, world_size: int = 1,
           pin_memory: bool = False, gpu_device=None) -> Callable[[int], Iterable[dict]]:
    """batches(epoch) for train(): this rank's batches, built by `workers` loader processes (0: inline)
    from EncodedSamples, each image decoded once, full or in draft mode, and cut to its view
    (gpu_device: decoded and preprocessed on that CUDA device instead, student/loader.py)."""
    from functools import partial

    from mcad.pipeline.store_data import kept_samples, verified_samples
    from mcad.student.data import student_parts
    from mcad.student.loader import BatchLoader, defer_crop

    samples = verified_samples(store, decode=False) if job.verify_data else partial(kept_samples, decode=False)
    decode = sample_decoder(job.decode, processor, crop)
    if workers:
        store.verify_files()  # hashed once here: the forked workers inherit it and skip it

    def parts(epoch: int):
        return student_parts(store, job.train, samples=samples, epoch=epoch,
                             crop=defer_crop if crop is not None else None, rank=rank, world_size=world_size)

    return BatchLoader(parts, processor=processor, decode=decode, workers=workers, pin_memory=pin_memory,
                       gpu_device=gpu_device, stop=job.train.epochs)


def check_gpu_decode(job: StudentJob, device, crop):
    """The CUDA device `--decode gpu` decodes on; one line when it cannot (no CUDA device, no torchvision,
    stored views to replay)."""
    import torch

    if torch_device_type(device) != "cuda" or not torch.cuda.is_available():
        raise InputError("--decode gpu decodes on the training's CUDA device: train on a GPU "
                         "(--gpus-per-worker) or use --decode draft|full")
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (missing, or a build that does not match torch)
        raise InputError(f"--decode gpu needs torchvision built for this torch ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); use --decode draft|full") from None
    if crop is not None:
        raise InputError("--decode gpu takes whole images: train with --views canonical, or --decode draft|full "
                         "to replay the stored views")
    return torch.device(device)


def sample_decoder(mode: str, processor, crop=None, *, margin: float = DRAFT_MARGIN) -> Callable:
    """decode(sample, box) for the loader: the sample with its image decoded (draft mode: at the
    smallest JPEG scale that still gives `margin` x the student's side in both dimensions, of the
    view's box when there is one) and, given a box, cut to that view by `crop` (pipeline.views.crop_sample)."""
    import math

    from mcad.student.models import image_size

    side = image_size(processor.image_processor)

    def decode(sample, box):
        if hasattr(sample, "decoded"):  # an EncodedSample
            draft = None
            if mode == "draft":
                width, height = (1.0, 1.0) if box is None else (float(box[2] - box[0]), float(box[3] - box[1]))
                draft = (math.ceil(margin * side / width), math.ceil(margin * side / height))
            sample = sample.decoded(draft=draft)
        return sample if box is None else crop(sample, box)

    return decode


def auto_loader_workers(job: StudentJob) -> int:
    """job.loader_workers, or with -1 (auto): 0 with online teachers, else one loader process per CPU
    this process may use (its Ray CPUs inside a Ray task, trial or rank; else its CPU affinity) but
    one, which the training keeps, up to AUTO_LOADER_MAX: 1 on 2 CPUs, 0 on one.

    Measured on 2 cores (photo-like shards, preset s; `mcad bench input`): 1 worker was as fast as
    2 or faster (740 against 705 samples/s near-quiet, 389 against 348 under load), both far
    ahead of none (444 and 390)."""
    import os

    if job.loader_workers != AUTO:
        return job.loader_workers
    if job.online_teachers:
        return 0
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    ray_cpus = _ray_assigned_cpus()
    if ray_cpus is not None:
        cpus = ray_cpus
    return max(0, min(int(cpus) - 1, AUTO_LOADER_MAX))


def _ray_assigned_cpus() -> float | None:
    """The CPUs Ray assigned this process when it is a Ray task, actor, trial or rank; None otherwise."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:  # the driver: nothing is assigned to it
            return None
        return float(context.get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 (an older or newer Ray without these: use the affinity)
        return None


def torch_device_type(device) -> str:
    import torch

    return torch.device(device).type


def view_crop(store, cfg: TrainConfig):
    """How the student cuts a stored view (pipeline.views.crop_sample), or None when it shows view 0 only
    (a store without views, or --views canonical); refuses a view recipe whose pixels this
    environment cannot remake (another box rule or Pillow version), naming the difference."""
    if store.num_views == 1 or cfg.views == "canonical":
        return None
    from mcad.pipeline.views import check_recipe, crop_sample

    check_recipe(store.views, where=str(store.path))
    return crop_sample


def _train_on_ray(job: StudentJob, *, progress: bool, store) -> dict:
    """Data parallel on Ray Train: `job.workers` ranks (gloo on CPU, nccl on GPU), one split each.

    Each rank streams its own shards of the store (the reader deals whole
    shards to ranks, so every pool is read by exactly one rank per epoch),
    computes the loss on its own batches and DDP averages the gradients: the
    effective batch is workers x pools-per-batch pools, and the distribution
    KL is still formed per pool, inside one rank. The run folder must be on
    storage every node sees. The driver shows rank 0's progress from RUN/metrics.jsonl (jobs/progress.py):
    the workers' own output is not forwarded.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mcad.jobs.progress import RunProgress
    from mcad.jobs.ray_cluster import node_resources, ray_session, require_fit, share_that_fits, wait_for_room
    from mcad.student.data import steps_per_epoch

    run = Path(job.out).resolve()
    with ray_session(job.ray_address):
        # Ray Train places all ranks at once, each on one node: refuse what the nodes can never
        # hold, and fail in one line what they cannot hold within the stall timeout.
        nodes = node_resources()
        per_worker = {"CPU": min(1.0, share_that_fits(nodes, "CPU", job.workers) or 1.0)}
        if job.gpus_per_worker:
            per_worker["GPU"] = job.gpus_per_worker
        require_fit(per_worker, "train-student worker", copies=job.workers, nodes=nodes)
        wait_for_room([per_worker] * job.workers, f"train-student's {job.workers} workers", job.stall_timeout_s)
        trainer = TorchTrainer(
            _train_worker, train_loop_config={"job": job, "progress": progress},
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(storage_path=str(run / "ray_train"), name="train"))
        total = job.train.epochs * steps_per_epoch(store, job.train, job.workers)
        with RunProgress({"train-student": run}, steps={"train-student": total}, epochs=job.train.epochs,
                         enabled=progress):
            trainer.fit()
    return last_epoch_record(run)


def _train_worker(config: dict) -> None:
    """One Ray Train rank: the same `fit` as a single process, on its split."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    job: StudentJob = config["job"]
    torch.set_num_threads(max(1, int(job.threads_per_worker or 1)))
    record = fit(job, rank=rank, world_size=size, device=ray.train.torch.get_device(),
                 progress=config["progress"] and rank == 0)
    ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})


def last_epoch_record(run: Path) -> dict:
    from mcad.student.curves import METRICS_FILE, read_metrics

    epochs = [r for r in read_metrics(Path(run) / METRICS_FILE) if r.get("kind") == "epoch"]
    return epochs[-1] if epochs else {}


def _prepare_run(job: StudentJob, run: Path, store) -> None:
    """Refuse to mix runs; pin the store's fingerprint; save the resolved config."""
    from mcad.storage.fs import require_empty

    pinned_path = run / FINGERPRINT_NAME
    fingerprint = store.fingerprint()
    if job.resume:
        if not pinned_path.exists():
            raise InputError(f"{run}: nothing to resume (no {FINGERPRINT_NAME})")
        pinned = json.loads(pinned_path.read_text())
        if pinned != json.loads(json.dumps(fingerprint)):
            changed = sorted(k for k in fingerprint if pinned.get(k) != json.loads(json.dumps(fingerprint[k])))
            raise InputError(f"cannot resume {run}: the store changed since ({', '.join(changed)} differ)")
    else:
        require_empty(run, "pass --resume to continue that run or choose a new --out")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(pinned_path, fingerprint)
    atomic_write_json(run / CONFIG_NAME, _jsonable(job))


def _jsonable(job: StudentJob) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(job), default=str))


def _validator(val_data: str | None, processor):
    if not val_data:
        return None
    from mcad.pipeline.evaluate import evaluate_student

    return lambda student: evaluate_student(student, processor, val_data)
