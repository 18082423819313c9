"""`mcad data ...`: datasets as WebDataset shards."""
from __future__ import annotations

import click


@click.group()
def data():
    """Make and inspect datasets (WebDataset shards)."""
