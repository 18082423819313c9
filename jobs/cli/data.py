"""`mcad data ...`: datasets as WebDataset shards."""
from __future__ import annotations

import sys

import click

SYNTH_EPILOG = """\b
Examples:
  mcad data synth --out data/shapes              10k/500/500 images, 48 px
  mcad data synth --out /tmp/tiny --train 200 --val 20 --test 40 --shard-size 100
  mcad data synth --out data/shapes --seed 1 --overwrite
"""


@click.group()
def data():
    """Make and inspect datasets (WebDataset shards)."""


@data.command("synth", epilog=SYNTH_EPILOG)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--train", default=10_000, show_default=True, help="Training images.")
@click.option("--val", default=500, show_default=True, help="Validation images.")
@click.option("--test", default=500, show_default=True, help="Test images (even: swap pairs, 5 captions each).")
@click.option("--image-size", default=48, show_default=True, help="Image side in pixels (at least 24).")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per tar shard.")
@click.option("--seed", default=0, show_default=True, help="Same seed and arguments give byte-identical shards.")
@click.option("--train-pairs", default=0.0, show_default=True,
              help="Share of train/val samples written as adjacent swap pairs (hard negatives in a pool).")
@click.option("--overwrite", is_flag=True, help="Replace shards already in --out.")
def synth(out, train, val, test, image_size, shard_size, seed, train_pairs, overwrite):
    """Write the shapes benchmark as WebDataset tar shards (img2dataset layout).

    OUT/{train,val,test}/000000.tar, ... hold KEY.jpg, KEY.txt (one caption) and
    KEY.json (all captions, objects, relation; test: pair id and variant).
    The test split is pairs of images that differ only by swapped colours or
    swapped places, so only attribute binding tells them apart.
    OUT/synth_config.json records the resolved config.
    """
    from tqdm import tqdm

    from mcad.pipeline.shapes.synth import SPLITS, SynthConfig, existing_shards, write_benchmark

    cfg = SynthConfig(train=train, val=val, test=test, image_size=image_size,
                      shard_size=shard_size, seed=seed, train_pairs=train_pairs)
    existing_shards(out, overwrite=overwrite)  # refuse before the progress bar starts
    with tqdm(total=cfg.total, desc="synth", unit="img", file=sys.stderr) as bar:
        summary = write_benchmark(cfg, out, overwrite=overwrite, on_sample=bar.update)
    for split in SPLITS:
        click.echo(f"{split:5s} {summary['counts'][split]:7d} images in {len(summary['shards'][split])} "
                   f"shards under {out}/{split}/")
    click.echo(f"config: {out}/synth_config.json ({image_size} px, seed {seed}, "
               f"vocabulary of {len(summary['vocabulary'])} words)")
