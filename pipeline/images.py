"""Pixel modes to 8-bit RGB, the one form the teachers and students read.

Shards hold CMYK JPEGs, PNGs with alpha, 16-bit greyscale, palettes;
`pipeline.shards` decodes them and calls `to_rgb`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: wide greyscale scaled down, transparency on white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit_grey(image)
    if image.has_transparency_data:
        # Composite on white: a plain convert("RGB") shows whatever colour the
        # transparent pixels happen to hold (often black).
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_8bit_grey(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float greyscale to 8 bit; Pillow would clip at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif image.mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0
    elif image.mode == "I" and values.size and values.max() > 255:
        values = values / 257.0  # "I" from a 16-bit file: assume the 16-bit range
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
