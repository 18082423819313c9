"""Teacher bootstrap data: a split held in memory, and pre-encoded for one teacher.

The bootstrap trains for many epochs over small images, so it decodes every
sample once and keeps uint8 pixels and token ids in memory (pipeline/shapes/bootstrap.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from mcad.storage.errors import InputError


@dataclass
class Split:
    """A split held in memory: one entry per image, its captions flattened with owners."""

    images: list  # PIL RGB
    captions: list[str]
    owner: np.ndarray  # (n_texts,) image index of each caption
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def n_images(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "Split":
        keep = self.owner < n
        return Split(self.images[:n], [c for c, k in zip(self.captions, keep) if k], self.owner[keep])


def split_from_samples(samples: Iterable) -> Split:
    """Samples with `.image` (PIL) and `.captions`; Rejects (with `.reason`) are counted."""
    images, captions, owner, rejects = [], [], [], {}
    for s in samples:
        if not hasattr(s, "image"):
            rejects[s.reason] = rejects.get(s.reason, 0) + 1
            continue
        owner += [len(images)] * len(s.captions)
        captions += list(s.captions)
        images.append(s.image.convert("RGB"))
    if not images:
        raise InputError(f"no usable samples (rejected: {rejects or 'none'})")
    return Split(images, captions, np.asarray(owner, dtype=np.int64), rejects)


def load_split(spec) -> Split:
    """Read every shard of `spec` (folder, glob, brace pattern, list) into memory."""
    from mcad.pipeline.shard_list import list_shards
    from mcad.pipeline.shards import iter_shard

    return split_from_samples(item for path in list_shards(spec) for item in iter_shard(path))


def to_pixels(images: Sequence, image_processor, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, S, S) after the processor's own resize/crop; normalised per batch later."""
    out = [image_processor(list(images[i:i + chunk]), do_rescale=False, do_normalize=False,
                           return_tensors="pt")["pixel_values"] for i in range(0, len(images), chunk)]
    return torch.cat(out).to(torch.uint8)


def normaliser(image_processor):
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    scale = image_processor.rescale_factor
    return lambda px: (px.float() * scale - mean) / std


def tokenize(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(captions), padding="longest", truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@dataclass
class Encoded:
    """A split ready for one teacher: uint8 pixels, token ids and the normaliser."""

    pixels: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    owner: torch.Tensor
    norm: object

    @classmethod
    def make(cls, split: Split, processor) -> "Encoded":
        ids, mask = tokenize(processor.tokenizer, split.captions)
        return cls(to_pixels(split.images, processor.image_processor), ids, mask,
                   torch.from_numpy(split.owner), normaliser(processor.image_processor))
