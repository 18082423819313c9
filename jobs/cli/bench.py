"""`mcad bench ...`: benchmarks that print ratios measured in one run (never tests)."""
from __future__ import annotations

import json

import click

STORE_EPILOG = """\b
Examples:
  mcad bench store                               20k rows, D=F=256, K=32, P=256
  mcad bench store --json bench-store.json --rows 100000 --shards 10
"""


@click.group()
def bench():
    """Measure speed and size; print ratios measured in one run, write --json."""


@bench.command(epilog=STORE_EPILOG)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the figures as JSON to this file.")
@click.option("--rows", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Rows in the synthetic store.")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True,
              help="Shards (Parquet files) the rows are split over.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Where to write the temporary store (default: the system temp folder).")
def store(json_path: str | None, rows: int, shards: int, workdir: str | None):
    """Signal store size on disk against its raw payload, and reader speed (rows/s as torch tensors)."""
    from mcad.jobs.bench.store import StoreBenchConfig, run_store_bench
    from mcad.storage.atomic import atomic_write_json
    from mcad.storage.errors import InputError

    if shards > rows:
        raise InputError(f"--shards {shards} is more than --rows {rows}")
    result = run_store_bench(StoreBenchConfig(rows=rows, shards=shards), workdir=workdir)
    click.echo(json.dumps(result, indent=2))
    if json_path:
        atomic_write_json(json_path, result)


def _register() -> None:
    from mcad.jobs.bench.presets import presets_bench
    from mcad.jobs.bench.report import report_cmd
    from mcad.jobs.bench.student import student_bench
    from mcad.jobs.bench.sweep import sweep_bench
    from mcad.jobs.bench.teacher_pass import teacher_pass_bench

    bench.add_command(student_bench)
    bench.add_command(teacher_pass_bench)
    bench.add_command(presets_bench)
    bench.add_command(report_cmd)
    bench.add_command(sweep_bench)


_register()
