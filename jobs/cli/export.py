"""`mcad export`: a trained student as an HF directory, ONNX or TorchScript encoders."""
from __future__ import annotations

import click


@click.command("export", epilog="""\b
Examples:
  mcad export --run runs/mcad --out export/hf
  mcad export --run runs/mcad --out export/onnx --format onnx
  mcad export --run runs/mcad --out export/ts --format torchscript
""")
@click.option("--run", "run", required=True, type=click.Path(exists=True, file_okay=False),
              help="A train-student run folder (or any CLIPModel directory).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(["hf", "onnx", "torchscript"]), default="hf",
              show_default=True)
def export_command(run, out, fmt):
    """Export a student: a standard Hugging Face CLIPModel dir, or its two encoders as graphs.

    ONNX/TorchScript write OUT/image_encoder.* and OUT/text_encoder.* (inputs
    -> L2-normalised embeddings), the processor files and export.json.
    """
    import shutil
    from pathlib import Path

    from mcad.storage.errors import InputError
    from mcad.student.models import load_processor

    src = Path(run) / "model" if (Path(run) / "model" / "config.json").exists() else Path(run)
    if not (src / "config.json").exists():
        raise InputError(f"{run}: no exported student (expected {Path(run) / 'model'}); has the run finished?")
    if fmt == "hf":
        shutil.copytree(src, out, dirs_exist_ok=True)
        click.echo(f"student -> {out} (Hugging Face CLIPModel)")
        return
    from transformers import CLIPModel

    from mcad.student.export import export_encoders

    clip = CLIPModel.from_pretrained(src, local_files_only=True, use_safetensors=True)
    files = export_encoders(clip, load_processor(src), out, fmt)
    click.echo(f"student -> {', '.join(str(f) for f in files)}")
