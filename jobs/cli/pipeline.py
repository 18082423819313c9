"""`mcad pipeline ...`: the teacher pass (once) and student training (often)."""
from __future__ import annotations

import functools

import click

from mcad.jobs.cli.options import field_option, report_to_option

PASS = functools.partial(field_option, "mcad.jobs.teacher_pass_job:TeacherPassJob")
STUDENT = functools.partial(field_option, "mcad.jobs.train_student:StudentJob")
TRAIN = functools.partial(field_option, "mcad.student.config:TrainConfig")
SWEEP = functools.partial(field_option, "mcad.jobs.sweep:SweepJob")


class FloatPair(click.ParamType):
    """LO,HI: two numbers (a range); the default may already be a pair."""

    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return tuple(float(x) for x in value)
        try:
            lo, hi = (float(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two numbers LO,HI", param, ctx)
        return lo, hi


@click.group()
def pipeline():
    """Run the teachers once over sharded data; train students from the signals."""


@pipeline.command("teacher-pass", epilog="""\b
Examples:
  mcad pipeline teacher-pass --data data/shapes/train --dual teachers/dual \\
      --single teachers/single --out store/
  mcad pipeline teacher-pass ... --out store/ --resume          continue after a crash
  mcad pipeline teacher-pass ... --out store/ --resume --break-lock   ... whose driver ran on a host now gone
  mcad pipeline teacher-pass ... --workers 4 --gpus-per-worker 1 --ray-address auto
  mcad pipeline teacher-pass ... --views 4 --single-views 2 --crop-scale 0.4,1 --seed 1
                  three random resized crops per sample beside the whole image (schema v2)
  mcad pipeline teacher-pass ... --pools neighbours    pools of look-alike samples (hard negatives)
""")
@click.option("--data", required=True,
              help="Shards: a folder, glob, {a..b} pattern or a text file of paths; local or a URI.")
@click.option("--dual", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dual-stream teacher: a Hugging Face CLIPModel directory.")
@click.option("--single", required=True, type=click.Path(exists=True, file_okay=False),
              help="Single-stream teacher: a Hugging Face BlipForImageTextRetrieval directory.")
@click.option("--out", required=True, help="Signal store: a folder or a URI (s3://, gs://, hdfs://, file://).")
@PASS("--pool", "pool_size", type=int, help="Samples per pool (P).")
@PASS("--topk", type=int, help="Candidates per sample and direction (K <= P).")
@PASS("--pair-batch", type=int,
      help="Image-text pairs per single-teacher forward (memory only: the signals do not change); "
           "0: sized to the device (256 on a CPU).")
@PASS("--calibration-rows", type=int, help="Rows the fusion projection W is fitted on (the first of the pass).")
@PASS("--workers", type=int, help="Teacher actors (each loads both teachers).")
@PASS("--gpus-per-worker", type=float, help="GPUs per actor (0: CPU).")
@PASS("--threads-per-worker", type=int, help="torch threads per actor (0: the node's CPUs divided by --workers).")
@PASS("--ray-address", type=str, help="Existing cluster ('auto', 'ray://host:port'); default: a local one.")
@PASS("--stall-timeout", "stall_timeout_s", type=float, help="Fail when no shard finishes for this many seconds.")
@PASS("--views", type=int,
      help="Views per sample: view 0 is the whole image, views 1..N-1 random resized crops stored as boxes "
           "(1: a store without views, as before).")
@PASS("--single-views", type=int, help="Views the single teacher also scores (the first M; 1: view 0 only).")
@PASS("--crop-scale", type=FloatPair(), help="Share of the image's area a crop covers, LO,HI.")
@PASS("--crop-ratio", type=FloatPair(), help="A crop's width / height, LO,HI (drawn log-uniform).")
@PASS("--seed", type=int, help="Seed of the crops' boxes (one generator per shard, row and view).")
@PASS("--pools", type=click.Choice(["consecutive", "neighbours"]),
      help="How a shard's samples form pools: consecutive, or neighbours (look-alikes grouped by the dual "
           "teacher's image embeddings; rows are then written pool by pool, and readers hold a shard's "
           "samples to join them).")
@click.option("--resume", "mode", flag_value="resume", help="Continue a store: skip finished shards.")
@click.option("--overwrite", "mode", flag_value="overwrite", help="Replace an existing store.")
@click.option("--break-lock", is_flag=True,
              help="Take the store's lock from a pass on another host that is gone (one pass writes a store "
                   "at a time; --resume takes over the lock of a dead pass on this host by itself).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the summary here.")
def teacher_pass(json_path, mode, **options):
    """Run the dual and single teachers once over the shards and write the signal store.

    Per input shard: signals/<shard>.parquet (embeddings, fused features, top-K
    candidates and logits per pool), rejects/<shard>.parquet (every sample not
    kept, with its reason), with --views N > 1 views/<shard>.parquet (each crop's
    box and the teachers on it), and manifest.json updated as each shard finishes.
    """
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass
    from mcad.storage.atomic import atomic_write_json

    summary = run_teacher_pass(TeacherPassJob(mode=mode or "fresh", **options))
    click.echo(f"{summary['rows']} rows from {summary['shards_run']} shards "
               f"({summary['shards_skipped']} already done, {summary['rejected']} samples rejected) "
               f"in {summary['seconds']:.1f} s -> {summary['store']}")
    if json_path:
        atomic_write_json(json_path, summary)


@pipeline.command("train-student", epilog="""\b
Examples:
  mcad pipeline train-student --store store/ --data data/shapes/train --out runs/mcad \\
      --val-data data/shapes/val
  mcad pipeline train-student ... --alpha 0 --beta 0 --out runs/dual_kd      dual-only KD
  mcad pipeline train-student ... --w-dist 0 --w-feat 0 --out runs/baseline  contrastive only
  mcad pipeline train-student ... --out runs/mcad --resume                   continue a run
  mcad pipeline train-student ... --workers 4 --ray-address auto             data parallel, Ray Train
  mcad pipeline train-student ... --views random       a store's crops, one drawn per sample and epoch
  mcad pipeline train-student ... --loader-workers 4 --decode full   4 processes build the batches
""")
@click.option("--store", required=True, help="Signal store: a folder or a URI (s3://, gs://, hdfs://, file://).")
@click.option("--data", required=True, help="The shards the store was made from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@STUDENT("--preset", type=str, help="Student size: smoke, s or m.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Start from this CLIP directory instead.")
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False),
              help="CLIP dir whose tokenizer/processor to use (default: the store's dual teacher).")
@TRAIN("--mode", type=click.Choice(["replay", "remix"]),
       help="replay: batches are whole teacher pools; remix: rows mixed across pools.")
@TRAIN("--views", type=click.Choice(["cycle", "random", "canonical"]),
       help="Which stored view each sample shows per epoch: cycle ((epoch + row) mod N), random, or "
            "canonical (view 0, the whole image). A store without views has only view 0.")
@TRAIN("--alpha", type=float, help="Fused-feature weight in the feature targets.")
@TRAIN("--beta", type=float, help="ITM-logit weight in the distribution targets.")
@TRAIN("--k-prime", type=int, help="Use only the first K' <= K candidates.")
@TRAIN("--kd-temperature", type=float,
       help="Distillation temperature T of the distribution KL (logits / T, KL x T^2).")
@TRAIN("--w-con", type=float, help="Weight of the contrastive loss.")
@TRAIN("--w-dist", type=float, help="Weight of the distribution KL.")
@TRAIN("--w-feat", type=float, help="Weight of the feature loss.")
@TRAIN("--w-rank", type=float,
       help="Weight of the ranking distillation (ListMLE over each query's K' stored candidates; 0: off).")
@TRAIN("--rank-by", type=click.Choice(["itm", "combined"]),
       help="Whose order the ranking term follows: the single teacher's ITM logits, or the combined target.")
@TRAIN("--itm-temperature", type=float, help="The ITM part of the distribution target is beta * m / this.")
@TRAIN("--itm-norm", type=click.Choice(["none", "pool"]),
       help="none: ITM logits as stored; pool: rescaled per pool to the spread of the dual logits first.")
@TRAIN("--epochs", type=int)
@TRAIN("--pools-per-batch", type=int, help="Replay: pools per student batch.")
@TRAIN("--batch-size", type=int, help="Remix: rows per student batch.")
@TRAIN("--lr", type=float)
@TRAIN("--seed", type=int)
@click.option("--val-data", help="Shards to report validation recall on after every epoch.")
@click.option("--online-teachers", nargs=2, type=click.Path(exists=True, file_okay=False),
              metavar="DUAL SINGLE", help="Compute the targets with these teachers in the loop.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--verify-data", is_flag=True,
              help="Hash each data tar as it streams and refuse one whose sha256 differs from the one the "
                   "teacher pass read (checked at the end of each shard; catches changes that keep size and mtime).")
@STUDENT("--workers", type=int,
         help="Data-parallel ranks on Ray Train (each streams its own shards); 1: this process.")
@STUDENT("--gpus-per-worker", type=float, help="GPUs per rank (nccl); 0: CPU (gloo).")
@STUDENT("--threads-per-worker", type=int, help="torch threads per rank (0: 1).")
@STUDENT("--ray-address", type=str,
         help="Existing cluster ('auto', 'ray://host:port'); default: a local one when --workers > 1.")
@STUDENT("--stall-timeout", "stall_timeout_s", type=float,
         help="With --workers > 1: fail when the ranks cannot be placed for this many seconds.")
@STUDENT("--loader-workers", type=click.IntRange(min=-1),
         help="Processes that read, decode and collate the batches, per rank (the same batches whatever the "
              "number); 0: in the training process; -1: one per CPU this process may use but one, up to 8.")
@STUDENT("--decode", type=click.Choice(["draft", "full", "gpu"]),
         help="draft: JPEGs decoded at the smallest scale that still covers twice the student's input size; "
              "full: every pixel, as the teacher pass decodes; gpu: decoded and preprocessed on the training's "
              "CUDA device (needs torchvision; whole images only).")
@report_to_option("RUN/tensorboard/ (data parallel: rank 0 writes)")
def train_student(store, data, out, preset, init, tokenizer_from, val_data, online_teachers, resume, verify_data,
                  workers, gpus_per_worker, threads_per_worker, ray_address, stall_timeout_s, loader_workers, decode,
                  report_to, **train):
    """Train a small dual-encoder student from the signal store, as cheaply as a CLIP fine-tune.

    Streams each shard's tar beside its signals file. Writes RUN/checkpoints/,
    RUN/metrics.jsonl, RUN/loss_curve.png, RUN/train_config.json and the
    student as a Hugging Face CLIPModel directory in RUN/model.
    """
    from mcad.jobs.train_student import StudentJob, run_train_student
    from mcad.student.config import TrainConfig

    job = StudentJob(store=store, data=data, out=out, train=TrainConfig(**train), preset=preset,
                     init=init, tokenizer_from=tokenizer_from, val_data=val_data,
                     online_teachers=tuple(online_teachers) if online_teachers else None, resume=resume,
                     verify_data=verify_data,
                     workers=workers, gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker,
                     ray_address=ray_address, stall_timeout_s=stall_timeout_s, report_to=report_to,
                     loader_workers=loader_workers, decode=decode)
    result = run_train_student(job)
    rsum = result["record"].get("val_rsum")
    click.echo(f"student -> {result['model']}" + (f" (val rsum {rsum:.1f})" if rsum is not None else ""))


@pipeline.command("sweep", epilog="""\b
Examples:
  mcad pipeline sweep --store store/ --data data/train --val-data data/val --out sweeps/a \\
      --grid alpha=0,0.5,1 --grid beta=0,1 --grid w_feat=0,1 --grid preset=smoke,s --parallel 2
  mcad pipeline sweep ... --out sweeps/a --resume            continue; finished trials are skipped
  mcad pipeline sweep ... --ray-address auto --parallel 16   on an existing cluster
""")
@click.option("--store", required=True, help="Signal store: a folder or a URI (s3://, gs://, hdfs://, file://).")
@click.option("--data", required=True, help="The shards the store was made from.")
@click.option("--val-data", required=True, help="Shards the trials are ranked on (validation rsum).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder.")
@click.option("--grid", "grid_specs", multiple=True, required=True, metavar="NAME=V1,V2,...",
              help="A setting and its values; repeat for a grid (any train-student loss/optimiser "
                   "setting, or preset).")
@SWEEP("--epochs", type=int, help="Epochs per trial (ASHA's horizon).")
@SWEEP("--parallel", type=int, help="Trials at once (the CPUs are shared).")
@SWEEP("--cpus-per-trial", type=float,
       help="CPUs each trial asks, at most the largest node's (0: a share that lets --parallel trials fit).")
@SWEEP("--grace-epochs", type=int, help="Epochs before ASHA may stop a trial.")
@SWEEP("--ray-address", type=str, help="Existing cluster ('auto', 'ray://host:port'); default: a local one.")
@SWEEP("--stall-timeout", "stall_timeout_s", type=float,
       help="Fail when trials wait this many seconds and none can start.")
@click.option("--resume", is_flag=True, help="Continue the sweep in --out: finished trials are skipped.")
@report_to_option("one run per trial, SWEEP/trials/<trial>/tensorboard/, its grid point as hparams "
                  "(tensorboard --logdir SWEEP/trials)")
def sweep(store, data, val_data, out, grid_specs, epochs, parallel, cpus_per_trial, grace_epochs, ray_address,
          stall_timeout_s, resume, report_to):
    """Train a grid of students from one signal store on Ray Tune; export the best.

    Every trial reads the same store (no teacher runs again), reports its
    validation rsum each epoch, and ASHA stops hopeless trials early. Writes
    SWEEP/results.csv (sorted by rsum), SWEEP/best (a Hugging Face CLIPModel
    directory), one run folder per trial in SWEEP/trials/, and sweep_config.json.
    """
    from mcad.jobs.sweep import SweepJob, format_table, parse_grid, run_sweep

    result = run_sweep(SweepJob(store=store, data=data, val_data=val_data, out=out, grid=parse_grid(grid_specs),
                                epochs=epochs, parallel=parallel, cpus_per_trial=cpus_per_trial,
                                grace_epochs=grace_epochs, ray_address=ray_address, resume=resume,
                                stall_timeout_s=stall_timeout_s, report_to=report_to))
    click.echo(format_table(result["table"]))
    click.echo(f"results -> {result['results']}; best student -> {result['best'] or '(no trial finished)'}")
