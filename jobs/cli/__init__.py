"""The `mcad` command line: a thin click layer over library functions.

Each command group lives in its own module of this package (`jobs/cli/*.py`). Those modules
import only click at module level; heavy imports (torch, ray, transformers)
happen inside the command functions, so `mcad --help` answers at once.
"""
from __future__ import annotations

import os
import sys

import click

from mcad.storage.errors import InputError, error_line

# torch's OpenMP threads spin-wait between parallel regions by default; on a CPU
# shared with other work that made 2 threads about 5x slower (mcad bench
# teacher-pass). libgomp reads this once when torch loads; local Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EPILOG = """\b
Examples:
  mcad demo                                  the whole flow on the shapes benchmark
  mcad data synth --out data/shapes          write the benchmark as WebDataset shards
  mcad pipeline teacher-pass --help          the Ray job that runs the teachers once
"""


class McadGroup(click.Group):
    """A group whose commands turn bad input into one line and exit code 2: click's usage
    errors, InputError, and OSError (unreadable input, read-only output, full disk)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a bare group: click prints its help
        except click.UsageError as exc:  # a missing path, a bad option value, an unknown command
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
            _fail(exc.format_message() + where)
        except (InputError, OSError) as exc:  # OSError: unreadable input, read-only output, full disk
            _fail(error_line(exc))


def _fail(message: str) -> None:
    click.echo(f"mcad: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


@click.group(cls=McadGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mcad")
def main():
    """mcad: distil big image-text teachers into a mobile-sized dual encoder (MCAD).

    The teachers run once (`mcad pipeline teacher-pass`) and write their
    signals to a Parquet signal store; students then train from that store
    as cheaply as a plain CLIP fine-tune, as often as you like.
    """


def _register() -> None:
    from mcad.jobs.cli.bench import bench
    from mcad.jobs.cli.data import data
    from mcad.jobs.cli.demo import demo
    from mcad.jobs.cli.eval import eval_command
    from mcad.jobs.cli.export import export_command
    from mcad.jobs.cli.pipeline import pipeline
    from mcad.jobs.cli.signals import signals
    from mcad.jobs.cli.teachers import teachers

    for command in (demo, data, teachers, pipeline, signals, eval_command, export_command, bench):
        main.add_command(command)


_register()
