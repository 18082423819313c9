"""`mcad teachers ...`: small teachers of our own, trained from scratch (for the demo)."""
from __future__ import annotations

import sys

import click

BOOTSTRAP_EPILOG = """\b
Examples:
  mcad data synth --out data/shapes --train 15000
  mcad teachers bootstrap --data data/shapes/train --val data/shapes/val \\
      --test data/shapes/test --out teachers/ --epochs 10 --blip-epochs 12
  mcad teachers bootstrap --data data/tiny/train --out /tmp/t --size smoke --epochs 1
"""


@click.group()
def teachers():
    """Make small teachers (a CLIP dual encoder and a BLIP-ITM single-stream model)."""


@teachers.command("bootstrap", epilog=BOOTSTRAP_EPILOG)
@click.option("--data", required=True, help="Training shards: folder, glob, brace pattern or list file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--val", default=None, help="Validation shards: pick beta of the combined score, per-epoch figures.")
@click.option("--test", "test_spec", default=None, help="Test shards: recall reported in teacher_recall.json.")
@click.option("--size", default="demo", show_default=True, help="Teacher size preset: smoke or demo.")
@click.option("--epochs", default=10, show_default=True, help="CLIP training epochs.")
@click.option("--blip-epochs", default=None, type=int, help="BLIP training epochs [default: --epochs].")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=5e-4, show_default=True, help="Peak AdamW learning rate (5% warmup, cosine).")
@click.option("--negatives", default="clip", show_default=True,
              help="Where BLIP's ITM hard negatives come from: clip (the trained CLIP) or itc (BLIP's own).")
@click.option("--top-k", default=16, show_default=True, help="Dual candidates the ITM head re-ranks in eval.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Saved weights: float32 or float16.")
@click.option("--threads", default=None, type=int, help="torch CPU threads [default: torch's choice].")
@click.option("--overwrite", is_flag=True, help="Replace teachers already in --out.")
def bootstrap(data, out, val, test_spec, size, epochs, blip_epochs, batch_size, lr, negatives, top_k, seed,
              dtype, threads, overwrite):
    """Train a CLIP and a BLIP-ITM from scratch on captioned WebDataset shards.

    Writes OUT/dual and OUT/single (standard Hugging Face dirs: plain
    transformers loads them), OUT/bootstrap_config.json (resolved config,
    loss and val figures per epoch, seconds) and OUT/teacher_recall.json
    (recall@1/5/10 of dual, single = ITM re-ranking of the dual's top-k, and
    combined = dual + beta * ITM, on val and test).
    """
    from pathlib import Path

    import torch

    from mcad.pipeline.shapes.bootstrap import BootstrapConfig, bootstrap as run
    from mcad.pipeline.shapes.bootstrap_data import load_split
    from mcad.storage.errors import InputError

    cfg = BootstrapConfig(size=size, epochs=epochs, blip_epochs=blip_epochs, batch_size=batch_size, lr=lr,
                          negatives=negatives, top_k=top_k, seed=seed, dtype=dtype)
    taken = [p for p in (Path(out) / "dual", Path(out) / "single") if p.exists()]
    if taken and not overwrite:
        raise InputError(f"{out} already holds teachers ({', '.join(p.name for p in taken)}); "
                         "pass --overwrite to replace them")
    if threads:
        torch.set_num_threads(threads)
    specs = {"train": data, "val": val, "test": test_spec}
    splits = {name: load_split(spec) for name, spec in specs.items() if spec}
    for name, split in splits.items():
        rejected = sum(split.rejects.values())
        click.echo(f"{name:5s} {split.n_images} images, {len(split.captions)} captions"
                   + (f", {rejected} rejected: {split.rejects}" if rejected else ""), err=True)
    result = run(cfg, splits["train"], out, val=splits.get("val"), test=splits.get("test"),
                 sources={k: v for k, v in specs.items() if v})
    _print_table(result["recall"])
    click.echo(f"teachers: {result['dual']} (dual), {result['single']} (single); "
               f"seconds: {result['seconds']}")


def _print_table(recall: dict) -> None:
    click.echo(f"beta = {recall['beta']} (from {recall['beta_from']}), top-k = {recall['top_k']}")
    click.echo(f"{'split':10s} {'teacher':9s} {'i2t R@1':>8s} {'R@5':>6s} {'R@10':>6s} "
               f"{'t2i R@1':>8s} {'R@5':>6s} {'R@10':>6s} {'rsum':>7s}")
    for split, figures in recall.items():
        if not isinstance(figures, dict):
            continue
        for teacher, r in figures.items():
            if "i2t" not in r:
                continue
            i, t = r["i2t"], r["t2i"]
            click.echo(f"{split:10s} {teacher:9s} {i['R@1']:8.2f} {i['R@5']:6.2f} {i['R@10']:6.2f} "
                       f"{t['R@1']:8.2f} {t['R@5']:6.2f} {t['R@10']:6.2f} {r['rsum']:7.2f}")
    sys.stdout.flush()
