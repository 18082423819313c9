"""`mcad bench ...`: benchmarks that print ratios measured in one run (never tests)."""
from __future__ import annotations

import click


@click.group()
def bench():
    """Measure speed and size; print ratios measured in one run, write --json."""
