"""Student export for deployment: the encoders as TorchScript or ONNX graphs.

The Hugging Face directory (`student.models.export_hf`) is the primary
format; these two wrap its image and text towers so a phone or a server can
run them without transformers:

    OUT/image_encoder.{pt,onnx}   pixel_values (B, 3, H, W)      -> (B, d) L2-normalised
    OUT/text_encoder.{pt,onnx}    input_ids, attention_mask (B, L) -> (B, d) L2-normalised

plus the processor/tokenizer files and `export.json` (shapes, logit scale).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from mcad.storage.errors import InputError
from mcad.student.models import clip_image_embeddings, clip_text_embeddings

FORMATS = ("hf", "onnx", "torchscript")


class ImageEncoder(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return clip_image_embeddings(self.clip, pixel_values)


class TextEncoder(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return clip_text_embeddings(self.clip, input_ids, attention_mask)


def example_inputs(clip, processor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One image of the model's size and two captions of the tokenizer's, for tracing."""
    size = clip.config.vision_config.image_size
    pixels = torch.zeros(2, 3, size, size)
    tokens = processor.tokenizer(["a", "a b"], padding="max_length", truncation=True,
                                 max_length=clip.config.text_config.max_position_embeddings,
                                 return_tensors="pt")
    return pixels, {k: tokens[k] for k in ("input_ids", "attention_mask")}


def export_encoders(clip, processor, out_dir: str | Path, fmt: str) -> list[Path]:
    """Write both encoders of a CLIPModel in `fmt` ("onnx" or "torchscript"); return the files."""
    if fmt not in ("onnx", "torchscript"):
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    clip = clip.eval().float()
    clip.config._attn_implementation = "eager"  # traceable attention, same numbers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels, tokens = example_inputs(clip, processor)
    image, text = ImageEncoder(clip), TextEncoder(clip)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer flags transformers' shape checks; the test compares outputs on new inputs.
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            files = [out / "image_encoder.pt", out / "text_encoder.pt"]
            torch.jit.trace(image, (pixels,)).save(str(files[0]))
            torch.jit.trace(text, (tokens["input_ids"], tokens["attention_mask"])).save(str(files[1]))
        else:
            files = [out / "image_encoder.onnx", out / "text_encoder.onnx"]
            _onnx(image, (pixels,), files[0], ["pixel_values"])
            _onnx(text, (tokens["input_ids"], tokens["attention_mask"]), files[1],
                  ["input_ids", "attention_mask"])
    processor.save_pretrained(out)
    (out / "export.json").write_text(json.dumps({
        "format": fmt, "files": [f.name for f in files], "embedding_dim": clip.config.projection_dim,
        "image_size": clip.config.vision_config.image_size,
        "text_length": clip.config.text_config.max_position_embeddings,
        "logit_scale": clip.logit_scale.exp().item(),
    }, indent=2))
    return files


def _onnx(module: nn.Module, args: tuple, path: Path, names: list[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # the exporter needs it
        raise InputError("ONNX export needs the onnx package: pip install 'mcad[export]'")
    axes = {name: {0: "batch"} for name in names}
    torch.onnx.export(module, args, str(path), input_names=names, output_names=["embedding"],
                      dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
