"""`mcad data ...`: datasets as WebDataset shards."""
from __future__ import annotations

import sys

import click

from mcad.jobs.cli.options import IntList, field_option

SYNTH_EPILOG = """\b
Examples:
  mcad data synth --out data/shapes              10k/1k/2k images, 48 px
  mcad data synth --out /tmp/tiny --train 200 --val 20 --test 40 --shard-size 100
  mcad data synth --out data/shapes --seed 1 --overwrite
  mcad data synth --out data/photos --image-size 480 --texture photo --train 512 --val 2 --test 2
                  the same scenes as 640x480 photo-like JPEGs (40-120 KB), for input benches
"""


def synth_option(*decls, **kwargs):
    return field_option("mcad.pipeline.shapes.synth_config:SynthConfig", *decls, **kwargs)


@click.group()
def data():
    """Make and inspect datasets (WebDataset shards)."""


@data.command("synth", epilog=SYNTH_EPILOG)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@synth_option("--train", type=int, help="Training images (never a val or test meaning).")
@synth_option("--val", type=int, help="Validation images (even: swap pairs, 5 captions each, meanings held out).")
@synth_option("--test", type=int, help="Test images (even: swap pairs, 5 captions each, meanings held out).")
@synth_option("--image-size", type=int, help="Image side in pixels (at least 24); photo: the height.")
@synth_option("--texture", type=click.Choice(["flat", "photo"]),
              help="flat: shapes on black (the benchmark); photo: the same scenes and captions in a 4:3 "
                   "frame of gradients and noise, JPEG quality 90 (web photos' size and decode cost).")
@synth_option("--shard-size", type=int, help="Samples per tar shard.")
@synth_option("--seed", type=int, help="Same seed and arguments give byte-identical shards.")
@synth_option("--train-pairs", type=float,
              help="Share of train samples written as adjacent swap pairs (hard negatives in a pool).")
@click.option("--hold-out-seeds", type=IntList(), default="", show_default=False, metavar="S,S,...",
              help="Also keep the val/test meanings of these seeds' benchmarks out of train "
                   "(data for teachers that are evaluated on those seeds).")
@click.option("--overwrite", is_flag=True, help="Replace shards already in --out.")
def synth(out, train, val, test, image_size, texture, shard_size, seed, train_pairs, hold_out_seeds, overwrite):
    """Write the shapes benchmark as WebDataset tar shards (img2dataset layout).

    OUT/{train,val,test}/000000.tar, ... hold KEY.jpg, KEY.txt (one caption) and
    KEY.json (all captions, objects, relation; val and test: pair id and variant).
    Val and test are pairs of images that differ only by swapped colours or
    swapped places, so only attribute binding tells them apart; no meaning
    (canonical scene) occurs in two splits.
    OUT/synth_config.json records the resolved config.
    """
    from tqdm import tqdm

    from mcad.pipeline.shapes.synth import SPLITS, SynthConfig, existing_shards, write_benchmark

    cfg = SynthConfig(train=train, val=val, test=test, image_size=image_size,
                      shard_size=shard_size, seed=seed, train_pairs=train_pairs, hold_out_seeds=hold_out_seeds,
                      texture=texture)
    existing_shards(out, overwrite=overwrite)  # refuse before the progress bar starts
    with tqdm(total=cfg.total, desc="synth", unit="img", file=sys.stderr) as bar:
        summary = write_benchmark(cfg, out, overwrite=overwrite, on_sample=bar.update)
    for split in SPLITS:
        click.echo(f"{split:5s} {summary['counts'][split]:7d} images in {len(summary['shards'][split])} "
                   f"shards under {out}/{split}/")
    size = f"{image_size} px" if texture == "flat" else f"{image_size * 4 // 3}x{image_size} px {texture}"
    click.echo(f"config: {out}/synth_config.json ({size}, seed {seed}, "
               f"vocabulary of {len(summary['vocabulary'])} words)")
