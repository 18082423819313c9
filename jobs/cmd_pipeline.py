"""`mcad pipeline ...`: the teacher pass (once) and student training (often)."""
from __future__ import annotations

import json

import click


@click.group()
def pipeline():
    """Run the teachers once over sharded data; train students from the signals."""


@pipeline.command("teacher-pass", epilog="""\b
Examples:
  mcad pipeline teacher-pass --data data/shapes/train --dual teachers/dual \\
      --single teachers/single --out store/
  mcad pipeline teacher-pass ... --out store/ --resume          continue after a crash
  mcad pipeline teacher-pass ... --workers 4 --gpus-per-worker 1 --ray-address auto
""")
@click.option("--data", required=True, help="Shards: a folder, glob, {a..b} pattern or a text file of paths.")
@click.option("--dual", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dual-stream teacher: a Hugging Face CLIPModel directory.")
@click.option("--single", required=True, type=click.Path(exists=True, file_okay=False),
              help="Single-stream teacher: a Hugging Face BlipForImageTextRetrieval directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Signal store folder.")
@click.option("--pool", "pool_size", default=256, show_default=True, help="Samples per pool (P).")
@click.option("--topk", default=32, show_default=True, help="Candidates per sample and direction (K <= P).")
@click.option("--batch-size", default=256, show_default=True, help="Image-text pairs per single-teacher forward.")
@click.option("--calibration-rows", default=2048, show_default=True,
              help="Rows the fusion projection W is fitted on (the first of the pass).")
@click.option("--workers", default=1, show_default=True, help="Teacher actors (each loads both teachers).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="GPUs per actor (0: CPU).")
@click.option("--threads-per-worker", default=0, show_default=True,
              help="torch threads per actor (0: the node's CPUs divided by --workers).")
@click.option("--ray-address", default=None, help="Existing cluster ('auto', 'ray://host:port'); default: a local one.")
@click.option("--stall-timeout", "stall_timeout_s", default=600.0, show_default=True,
              help="Fail when no shard finishes for this many seconds.")
@click.option("--resume", "mode", flag_value="resume", help="Continue a store: skip finished shards.")
@click.option("--overwrite", "mode", flag_value="overwrite", help="Replace an existing store.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the summary here.")
def teacher_pass(json_path, mode, **options):
    """Run the dual and single teachers once over the shards and write the signal store.

    Per input shard: signals/<shard>.parquet (embeddings, fused features, top-K
    candidates and logits per pool), rejects/<shard>.parquet (every sample not
    kept, with its reason), and manifest.json updated as each shard finishes.
    """
    from jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    summary = run_teacher_pass(TeacherPassJob(mode=mode or "fresh", **options))
    click.echo(f"{summary['rows']} rows from {summary['shards_run']} shards "
               f"({summary['shards_skipped']} already done, {summary['rejected']} samples rejected) "
               f"in {summary['seconds']:.1f} s -> {summary['store']}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(summary, fh, indent=2)
