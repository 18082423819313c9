"""`mcad pipeline teacher-pass`: run both teachers ONCE over sharded data (Ray Data).

One Ray Data row per input shard; an actor pool of workers, each loading both
teachers once in `__init__` (the Ray batch-inference pattern), turns a shard
into its signals file through plain functions of `pipeline/` and `storage/`.
The driver records each finished shard in the manifest, so a crash loses at
most the shards in flight and `--resume` skips the rest.

    mcad pipeline teacher-pass --data data/shapes/train --dual teachers/dual \
        --single teachers/single --out store/
    mcad pipeline teacher-pass ... --views 4 --single-views 2     three crops per sample (schema v2)

This module is the driver: the plan, the store's preparation and resume
checks, the calibration of the fusion projection, and the manifest. The
actors (`ShardWorker`, `process_shard`: each pool read, decoded and
preprocessed ahead while the teachers run the current one) are
jobs/teacher_pass_worker.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Iterator

from mcad.jobs.ray_cluster import ray_session
from mcad.jobs.teacher_pass_job import TeacherPassJob
from mcad.jobs.teacher_pass_worker import ERROR, MAX_DECODE_THREADS, ShardWorker
from mcad.storage import fs
from mcad.storage.manifest import (
    FUSION_PROJ_NAME, LOCK_NAME, MANIFEST_NAME, Manifest, PARAM_D, PARAM_F, PARAM_FUSION_PROJ_SHA256, PARAM_K,
    PARAM_LOGIT_SCALE, PARAM_POOL_SIZE, PASS_CONFIG_NAME, POOLS, REJECTED, REJECTS_BYTES, REJECTS_DIR,
    REJECTS_SHA256, ROWS, SECONDS, SIGNALS_BYTES, SIGNALS_DIR, SIGNALS_SHA256, SOURCE_SHA256, STATUS,
    STATUS_DONE, STATUS_PENDING, VIEWS_BYTES, VIEWS_DIR, VIEWS_SHA256, file_digest, manifest_path,
    pass_pool_mode, same_source, signals_path, source_identity, store_file, verify_projection, views_path,
)
from mcad.storage.lock import acquire
from mcad.storage.atomic import sweep_temporaries
from mcad.storage.errors import InputError, error_line

CONFIG_NAME = PASS_CONFIG_NAME


def run_teacher_pass(job: TeacherPassJob, *, progress: bool = True) -> dict:
    """The whole pass: plan, calibrate the fusion projection, run the shards, return a summary."""
    from mcad.pipeline.shard_list import list_shards, shard_name
    from mcad.pipeline.teachers import check_teacher_dirs

    job.pass_config()  # validate P and K, and the teachers' folders, before anything starts
    check_teacher_dirs(job.dual, job.single)
    sources = list_shards(job.data)
    names = [shard_name(s) for s in sources]
    _check_unique(sources, names)
    job = dataclasses.replace(job, out=fs.absolute(job.out))  # workers may run elsewhere
    out = job.out
    # One writer per store, for the whole run (released on failure too; a SIGKILL leaves it).
    lock = acquire(out, take_dead=job.mode in ("resume", "overwrite"), break_lock=job.break_lock, say=_say)
    try:
        return _locked_pass(job, out, sources, names, progress)
    finally:
        lock.release()


def _say(line: str) -> None:
    print(f"mcad: {line}", file=sys.stderr, flush=True)


def _locked_pass(job: TeacherPassJob, out: str, sources: list[str], names: list[str], progress: bool) -> dict:
    manifest = _prepare_store(job, out)
    pending = [(s, n) for s, n in zip(sources, names) if not _is_done(manifest, out, s, n)]
    started = time.perf_counter()
    with ray_session(job.ray_address, stall_timeout_s=job.stall_timeout_s) as cluster:
        proj_path = store_file(out, FUSION_PROJ_NAME)
        try:
            # Every planned shard is in the manifest before any runs, so a reader can tell N of M done.
            for source, name in pending:
                manifest.record_shard(name, {**source_identity(source), ROWS: 0, REJECTED: 0, POOLS: 0,
                                             SECONDS: 0.0, STATUS: STATUS_PENDING})
            if pending:
                manifest.save(out)
            if not manifest.teachers:  # a new store, or one that crashed before its first save
                manifest.teachers, measured = _calibrate(job, sources, proj_path)
                manifest.params = {**_params(job, proj_path), **measured}
                manifest.set_views(job.view_config().recipe())  # schema v2 when N > 1
                manifest.save(out)
            else:  # resumed: the shards still to run use the stored W, the one the manifest records
                verify_projection(out, manifest)
            summaries = list(_run_shards(job, pending, manifest, out, proj_path, cluster, progress))
        except OSError as exc:  # the driver's own writes: the manifest on a full disk
            raise InputError(f"teacher pass stopped: {error_line(exc)}; the shards its manifest records "
                             f"are kept in {out}, rerun with --resume once the cause is fixed") from None
    # A worker killed mid-write (and retried elsewhere) leaves its temporary
    # file behind; every writer has finished now, so none of them is live.
    _sweep_temporaries(out)
    seconds = time.perf_counter() - started
    rows = sum(s["rows"] for s in summaries)
    return {"store": str(out), "shards_total": len(sources), "shards_run": len(summaries),
            "shards_skipped": len(sources) - len(pending), "rows": rows,
            "rejected": sum(s["rejected"] for s in summaries), "seconds": seconds,
            "samples_per_s": rows / seconds if seconds else 0.0}


def _run_shards(job, pending, manifest, out, proj_path, cluster, progress) -> Iterator[dict]:
    import ray
    from tqdm import tqdm

    if not pending:
        return
    cpus = float(cluster["resources"].get("CPU", os.cpu_count() or 1))
    threads = job.threads_per_worker or max(1, int(cpus // job.workers))
    # The cores of the actor's share its torch threads leave free decode the next pool's images.
    decode_threads = min(MAX_DECODE_THREADS, max(0, int(cpus // job.workers) - threads))
    actor_cpus = _actor_request(job)["CPU"]
    ds = ray.data.from_items([{"source": s, "shard": n} for s, n in pending])
    ds = ds.map_batches(
        ShardWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=actor_cpus, num_gpus=job.gpus_per_worker or None,
        fn_constructor_kwargs={"job": job, "projection_path": str(proj_path), "threads": threads,
                               "decode_threads": decode_threads},
    )  # Ray Data restarts lost actors and retries their shards by itself (max_restarts=-1)
    identity = {s: source_identity(s) for s, _ in pending}
    bar = tqdm(total=len(pending), unit="shard", disable=not progress, desc="teacher pass")
    rows, t0 = 0, time.perf_counter()
    for row in _finished(ds):
        if row[ERROR]:
            bar.leave = False  # the error line stands alone
            bar.close()
            raise InputError(f"teacher pass stopped at shard {row['shard']} ({row['source']}): {row[ERROR]}; "
                             f"{len(manifest.done_shards())} finished shards are kept in {out}, "
                             f"rerun with --resume once the cause is fixed")
        entry = {**identity[str(row["source"])], ROWS: int(row["rows"]),
                 REJECTED: int(row["rejected"]), POOLS: int(row["pools"]),
                 SECONDS: float(row["seconds"]), STATUS: STATUS_DONE, SOURCE_SHA256: str(row[SOURCE_SHA256]),
                 SIGNALS_SHA256: str(row[SIGNALS_SHA256]), SIGNALS_BYTES: int(row[SIGNALS_BYTES]),
                 REJECTS_SHA256: str(row[REJECTS_SHA256]), REJECTS_BYTES: int(row[REJECTS_BYTES])}
        if job.views > 1:
            entry.update({VIEWS_SHA256: str(row[VIEWS_SHA256]), VIEWS_BYTES: int(row[VIEWS_BYTES])})
        manifest.record_shard(str(row["shard"]), entry)
        manifest.save(out)
        rows += entry[ROWS]
        bar.set_postfix(samples_per_s=f"{rows / (time.perf_counter() - t0):.1f}")
        bar.update(1)
        yield {"shard": str(row["shard"]), **entry}
    bar.close()


def _actor_request(job: TeacherPassJob) -> dict:
    """One teacher actor's resources, refused at once (one line) when no node can hold them.

    An actor runs on one node: its CPUs are a share that lets the pool's actors
    fit the nodes at once, and leave room for Ray Data's read task (an actor
    pool holding every CPU deadlocks it on a small machine: seen with 2 actors
    of 1 CPU on 2 CPUs).
    """
    from mcad.jobs.ray_cluster import node_resources, require_fit, share_that_fits

    nodes = node_resources()
    total = sum(float(node.get("CPU", 0.0)) for node in nodes)
    cpus = min(1.0, max(total - 0.5, 0.1) / job.workers, share_that_fits(nodes, "CPU", job.workers) or 1.0)
    request = {"CPU": cpus, "GPU": job.gpus_per_worker}
    require_fit(request, "teacher-pass actor", nodes=nodes)
    return request


def _finished(ds) -> Iterator[dict]:
    """Each shard's result as soon as its worker returns it. `iter_rows` prefetches:
    it held a finished shard back until the next one finished, so a crash lost it."""
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _calibrate(job: TeacherPassJob, sources: list[str], proj_path) -> tuple[dict, dict]:
    """Fit W on the first calibration rows of the pass, as a Ray task where the workers run.

    Returns the teachers' identities (paths and digests) and the pass
    parameters only the loaded teachers know, for the manifest.
    """
    import ray

    from mcad.jobs.ray_cluster import get_one_line

    _actor_request(job)  # a pass whose actors can never be placed is refused before any teacher runs
    task = ray.remote(num_cpus=1, num_gpus=job.gpus_per_worker or None)(_calibrate_task)
    return get_one_line(task.remote(job, sources, str(proj_path)), "teacher pass")


def _calibrate_task(job: TeacherPassJob, sources: list[str], proj_path: str) -> dict:
    from itertools import chain

    from mcad.pipeline.shards import iter_shard
    from mcad.pipeline.projection import calibrate, save_projection
    from mcad.pipeline.teachers import load_teachers

    dual, single = load_teachers(job.dual, job.single)
    items = chain.from_iterable(iter_shard(s) for s in sources)
    save_projection(calibrate(dual, single, items, config=job.pass_config()), proj_path)
    teachers = {"dual": dual.identity(), "single": single.identity()}
    return teachers, {PARAM_LOGIT_SCALE: dual.logit_scale,
                      PARAM_FUSION_PROJ_SHA256: file_digest(proj_path),
                      "image_size": _image_sizes(dual, single)}


def _image_sizes(*teachers) -> list[dict]:
    sizes = [dict(getattr(t.processor.image_processor, "size", {}) or {}) for t in teachers]
    return [{k: v for k, v in size.items() if v is not None} for size in sizes]


def _params(job: TeacherPassJob, proj_path) -> dict:
    from mcad.pipeline.projection import load_projection

    w = load_projection(proj_path)
    cfg = job.pass_config()
    # Only what defines the signals: the fingerprint a student pins covers all of it.
    return {PARAM_POOL_SIZE: cfg.pool_size, PARAM_K: cfg.topk,
            PARAM_F: int(w.shape[0]), PARAM_D: int(w.shape[1]),
            "calibration_rows": cfg.calibration_rows, "ridge": cfg.ridge,
            "embedding_dtype": "float16", "logit_dtype": "float32"}


def _prepare_store(job: TeacherPassJob, out: str) -> Manifest:
    """Fresh, resumed or overwritten store (a folder or a URI); the resolved config written beside it."""
    # The config is written first, so any store a crash left behind has one.
    has_store = fs.exists(manifest_path(out)) or fs.exists(store_file(out, CONFIG_NAME))
    if has_store and job.mode == "fresh":
        raise InputError(f"{out} already holds a signal store; pass --resume to continue it "
                         f"or --overwrite to replace it")
    if job.mode == "overwrite":
        for name in (MANIFEST_NAME, FUSION_PROJ_NAME, CONFIG_NAME):
            fs.remove(store_file(out, name))
        for sub in (SIGNALS_DIR, REJECTS_DIR, VIEWS_DIR):
            fs.remove_tree(store_file(out, sub))
        has_store = False
    elif not has_store:
        fs.require_empty(out, "it holds no signal store to continue; choose an empty or new folder",
                         ignore=(LOCK_NAME,))
    fs.makedirs(out)
    manifest = Manifest.load(out) if fs.exists(manifest_path(out)) else Manifest()
    if has_store:
        _check_resumable(job, out, manifest)
    _sweep_temporaries(out)
    fs.write_json(store_file(out, CONFIG_NAME), dataclasses.asdict(job))
    return manifest


def _sweep_temporaries(out: str) -> None:
    """Remove what a crashed writer left (local stores; at a URI nothing is written under a temporary name)."""
    if not fs.is_uri(out):
        for folder in (out, *(store_file(out, sub) for sub in (SIGNALS_DIR, REJECTS_DIR, VIEWS_DIR))):
            sweep_temporaries(folder)


def _check_resumable(job: TeacherPassJob, out: str, manifest: Manifest) -> None:
    import json

    from mcad.pipeline.teachers import teacher_digests

    config = store_file(out, CONFIG_NAME)
    saved = json.loads(fs.read_bytes(config)) if fs.exists(config) else {}
    same = ("dual", "single", "pool_size", "topk", "calibration_rows", "views", "single_views", "crop_scale",
            "crop_ratio", "seed")
    # Compared as JSON (tuples were written as lists); a config from before views has none of theirs.
    changed = [k for k in same if k in saved and saved[k] != json.loads(json.dumps(getattr(job, k)))]
    # Done shards were written with the stored pool mode, and readers take the row order from it.
    stored_pools = pass_pool_mode(out)
    if stored_pools != job.pools:
        raise InputError(f"cannot resume {out}: the pool mode ({job.pools}) differs from the stored pass's "
                         f"({stored_pools}); resume with --pools {stored_pools}, or use --overwrite to start again")
    if manifest.teachers:  # the recipe the stored shards were cut with, Pillow's version included
        recipe = job.view_config().recipe() if job.views > 1 else None
        if manifest.views != recipe:
            diff = sorted(k for k in {*(manifest.views or {}), *(recipe or {})}
                          if (manifest.views or {}).get(k) != (recipe or {}).get(k))
            changed.append(f"the view recipe ({', '.join(diff)})")
    # Same paths are not the same teachers: the files may have been replaced.
    for role, path in (("dual", job.dual), ("single", job.single)):
        pinned = manifest.teachers.get(role)
        if pinned:
            now = teacher_digests(path)
            changed += [f"the {role} teacher's {key}" for key in sorted(now) if pinned.get(key) != now[key]]
    if changed:
        raise InputError(f"cannot resume {out}: {', '.join(changed)} differ from the stored pass; "
                         f"use --overwrite to start again")


def _is_done(manifest: Manifest, out: str, source: str, name: str) -> bool:
    entry = manifest.shards.get(name)
    if not entry or entry.get(STATUS) != STATUS_DONE or not fs.exists(signals_path(out, name)):
        return False
    if manifest.views and not fs.exists(views_path(out, name)):
        return False
    now = source_identity(source)
    if not same_source(entry, now):
        raise InputError(f"input shard {source} changed since it was processed; use --overwrite")
    return True


def _check_unique(sources: list[str], names: list[str]) -> None:
    seen: dict[str, str] = {}
    for src, name in zip(sources, names):
        if name in seen:
            raise InputError(f"two input shards share the name {name!r}: {seen[name]} and {src}; "
                             f"run one teacher pass per split")
        seen[name] = src
