"""`mcad eval`: recall@1/5/10 of a student or a teacher (any CLIPModel dir) on WebDataset shards.

Registered in jobs/cli/__init__.py as `main.add_command(eval_command)`.
"""
from __future__ import annotations

import click

EVAL_EPILOG = """\b
Examples:
  mcad eval --model demo_out/runs/mcad/model --data demo_out/data/test
  mcad eval --model teachers/dual --data data/shapes/test --json out/teachers.json
  mcad eval --model teachers/dual --single teachers/single --data data/shapes/test \\
      --rerank-k 16 --beta 0.5 --json out/teachers.json
"""


@click.command("eval", epilog=EVAL_EPILOG)
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A CLIPModel dir: a student (mcad export) or the dual teacher.")
@click.option("--data", required=True, help="Eval shards: folder, glob, brace pattern or list file.")
@click.option("--single", default=None, type=click.Path(),
              help="A BLIP-ITM dir: also report its re-ranking of --model's top-k (single) "
                   "and dual + beta * ITM (combined).")
@click.option("--rerank-k", type=int, default=None, help="Candidates per query the single teacher re-scores [16].")
@click.option("--beta", type=float, default=None,
              help="Weight of the ITM logit in the combined score [the beta chosen on val in teacher_recall.json "
                   "beside --single's folder (the shipped demo teachers have one), else 1.0].")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the figures here (and the resolved config beside it, *.config.json).")
@click.option("--batch-size", default=64, show_default=True, help="Images (and captions) per forward pass.")
@click.option("--device", default=None, help="torch device [cuda if present, else cpu].")
def eval_command(model_dir, data, single, rerank_k, beta, json_path, batch_size, device):
    """Recall@1/5/10 image->text and text->image, and rsum, of a CLIPModel dir.

    Every image is scored against every caption of the split (all captions of
    each image, the 5-caption protocol); an image->text query hits when any
    of its captions is in the top K. With --single, the single-stream teacher
    is evaluated as BLIP/ALBEF do: its ITM head re-ranks --model's top-k.
    Samples the shards cannot give are counted (n_rejected), never dropped.
    """
    import time
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from mcad.pipeline.evaluate import DEFAULT_RERANK_K, evaluate, recall_table
    from mcad.pipeline.shard_list import list_shards
    from mcad.storage.atomic import atomic_write_json
    from mcad.storage.errors import InputError

    if single is None and (rerank_k is not None or beta is not None):
        raise InputError("--rerank-k and --beta need --single (the single-stream teacher that re-ranks)")
    k = DEFAULT_RERANK_K if rerank_k is None else rerank_k
    start = time.time()
    result = evaluate(model_dir, data, single=single, rerank_k=k, beta=beta, batch_size=batch_size,
                      device=device, progress=True)
    seconds = round(time.time() - start, 2)
    rows = result if single is not None else {"model": result}
    click.echo(recall_table(rows))
    first = next(iter(rows.values()))
    if first["n_rejected"]:
        click.echo(f"warning: {first['n_rejected']} samples rejected and not evaluated: {first['rejected']}",
                   err=True)
    if json_path:
        out = Path(json_path)
        atomic_write_json(out, result)
        try:
            mcad_version = version("mcad")
        except PackageNotFoundError:
            mcad_version = None
        atomic_write_json(out.with_name(out.stem + ".config.json"), {
            "command": "eval", "mcad_version": mcad_version, "model": str(Path(model_dir).resolve()),
            "data": data, "shards": list_shards(data), "single": str(Path(single).resolve()) if single else None,
            "rerank_k": k if single else None,
            "beta": result["combined"]["beta"] if single else None,
            "batch_size": batch_size, "device": device, "seconds": seconds})
        click.echo(f"figures: {out}")
