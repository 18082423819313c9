"""`mcad bench input`'s decode options (jobs/bench/input.py's module doc): JPEG draft mode and the
tensor path of --decode gpu against the processor's PIL path, and torchvision.io.decode_jpeg on
CUDA where CUDA and torchvision exist."""
from __future__ import annotations

import time

# The bound draft mode is held to: the dual teacher's image embeddings of the draft- and the full-decoded
# image keep a cosine of at least DRAFT_BOUND for every image measured. For scale, the bench also measures
# a JPEG re-encode at REENCODE_QUALITY (what img2dataset does to every web image it resizes, its default
# quality 95): a change web data has always carried, of the same order (min cosine 0.9993-0.99994 over
# the photo-like images).
DRAFT_BOUND = 0.9995
REENCODE_QUALITY = 95


def decode_options(samples: list, *, dual, pool: int) -> dict:
    """Draft mode and the tensor path against the PIL path: ms per image (decode + the dual
    teacher's processor), pixel difference and the dual teacher's embedding cosine (module doc)."""
    import io

    import torch
    from PIL import Image

    from mcad.jobs.train_student import DRAFT_MARGIN
    from mcad.student.models import image_size

    processor = dual.processor.image_processor
    side = image_size(processor)
    out: dict = {"side": side, "images": len(samples), "draft_margin": DRAFT_MARGIN,
                 "bound_min_cosine": DRAFT_BOUND}

    def pil(image):
        return processor([image], return_tensors="pt")["pixel_values"][0]

    def reencoded(image):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    margin = DRAFT_MARGIN * side
    paths = {"pil_full": lambda s: pil(s.decoded().image),
             "pil_draft": lambda s: pil(s.decoded(draft=(margin, margin)).image),
             "pil_draft_1x": lambda s: pil(s.decoded(draft=(side, side)).image),
             "tensor_full": lambda s: _tensor_path(s.decoded().image, processor, side),
             "reencode_q95": lambda s: pil(reencoded(s.decoded().image))}
    pixels = {}
    for name, path in paths.items():
        t0 = time.perf_counter()
        pixels[name] = torch.stack([path(s) for s in samples])
        out[f"{name}_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(samples)
    out["tensor_backend"] = _TENSOR_BACKEND
    with torch.inference_mode():
        full = _embed(dual, pixels["pil_full"], pool)
        for name in ("pil_draft", "pil_draft_1x", "tensor_full", "reencode_q95"):
            emb = _embed(dual, pixels[name], pool)
            cos = (full * emb).sum(-1)
            out[f"{name}_cosine_mean"] = float(cos.mean())
            out[f"{name}_cosine_min"] = float(cos.min())
            out[f"{name}_pixel_mean_abs"] = float((pixels[name] - pixels["pil_full"]).abs().mean())
    out["draft_within_bound"] = out["pil_draft_cosine_min"] >= out["bound_min_cosine"]
    out["draft_1x_within_bound"] = out["pil_draft_1x_cosine_min"] >= out["bound_min_cosine"]
    out["gpu_decode"] = _gpu_decode(samples)
    return out


_TENSOR_BACKEND = "student.loader.tensor_pixels: torch bicubic antialiased resize (the --decode gpu preprocessing)"


def _tensor_path(image, processor, side: int):
    """Decoded image -> the tensor path's pixel_values, on the CPU (the GPU path's arithmetic)."""
    import numpy as np
    import torch

    from mcad.student.loader import tensor_pixels

    return tensor_pixels(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1), processor)


def _embed(dual, pixels, pool: int):
    import torch

    from mcad.student.models import clip_image_embeddings

    emb = torch.cat([clip_image_embeddings(dual.model, pixels[i:i + pool].to(dual.device, dual.dtype)).float()
                     for i in range(0, len(pixels), pool)])
    return torch.nn.functional.normalize(emb, dim=-1)


def _gpu_decode(samples: list) -> dict:
    """torchvision.io.decode_jpeg on CUDA for pools of raw JPEG bytes: images/s, or why not measured."""
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "why": "no CUDA device"}
    try:
        from torchvision.io import decode_jpeg
    except Exception as exc:  # noqa: BLE001
        return {"measured": False, "why": f"torchvision does not import ({type(exc).__name__})"}
    data = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in samples]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(data), 64):
        decode_jpeg(data[i:i + 64], device="cuda")
    torch.cuda.synchronize()
    return {"measured": True, "images_per_s": len(data) / (time.perf_counter() - t0)}
