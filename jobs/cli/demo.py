"""`mcad demo`: the whole flow on the embedded shapes benchmark."""
from __future__ import annotations

import functools

import click

from mcad.jobs.cli.options import field_option

DEMO = functools.partial(field_option, "mcad.jobs.demo:DemoConfig")


@click.command("demo", epilog="""\b
Examples:
  mcad demo                          full run into ./demo_out (about 10 minutes on 2 CPU cores)
  mcad demo --quick --out /tmp/demo  the same flow, small (about 2 minutes)
  mcad demo --retrain-teachers       bootstrap fresh teachers instead of the shipped ones (slow)
""")
@DEMO("--out", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Small sizes: the same flow in about two minutes.")
@DEMO("--seed", type=int, help="Seed of the benchmark and the students.")
@click.option("--retrain-teachers", is_flag=True, help="Train new demo teachers instead of the shipped ones.")
@click.option("--teachers", type=click.Path(exists=True, file_okay=False),
              help="Use the teachers in this folder (dual/, single/) instead of the shipped ones.")
@DEMO("--ray-address", type=str,
      help="Run the teacher pass and the students on this cluster ('auto', 'ray://host:port'); "
           "default: a local one.")
def demo(out, quick, seed, retrain_teachers, teachers, ray_address):
    """Run the whole flow on the shapes benchmark and print the recall table.

    Writes the benchmark, takes the shipped demo teachers, runs the teacher
    pass on a local Ray cluster, trains three students from the one store
    side by side (contrastive baseline, dual-only KD, MCAD), evaluates teachers and
    students on the test split, and writes OUT/results.json and OUT/recall.png.
    """
    from mcad.jobs.demo import DemoConfig, run_demo

    extra = {"teachers": teachers} if teachers else {}
    run_demo(DemoConfig.make(out=out, quick=quick, seed=seed, retrain_teachers=retrain_teachers,
                             ray_address=ray_address, **extra),
             echo=click.echo)
