"""Image members to 8-bit RGB, the one form the teachers and students read: decoding and pixel modes.

`decode_image` (public; pipeline/shards.py calls `_decode_image`, which says why
an image is unusable instead of raising InputError) opens a member's bytes with
the web formats' decoders only, checks the size from the header before decoding
(`max_pixels`), optionally decodes a JPEG at a smaller DCT scale (`draft`), and
converts to RGB. Unusable images get one of the two image reasons of the shard
reader's REASONS, defined here: CORRUPT_IMAGE, IMAGE_TOO_LARGE.

Shards hold CMYK JPEGs, PNGs with alpha, 16-bit greyscale, palettes; `to_rgb`
brings every mode to 8-bit RGB (decoding calls it).
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from mcad.storage.errors import InputError

CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"

# 8192 x 8192: far above web images (img2dataset usually resizes to <= 512) and
# below Pillow's own warning limit, so the decoded RGB stays under ~200 MB.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Decoders we let Pillow try: the web formats (a .jpg may hold a PNG or GIF);
# nothing that calls out to external programs (EPS) or is rarely fuzzed.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO


class UnusableImage(Exception):
    """Why an image member cannot be used: `reason` (CORRUPT_IMAGE or IMAGE_TOO_LARGE) and `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def decode_image(raw: bytes, *, draft: tuple[int, int] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image member's bytes as 8-bit RGB, as iter_shard decodes it (InputError if unusable).

    draft=(w, h): a JPEG is decoded at the smallest of its DCT scales (1/1, 1/2, 1/4, 1/8)
    that still gives at least w x h pixels (Pillow's Image.draft); other formats, and JPEGs
    already that small, decode in full. Faster, and not the same pixels: docs/design.md,
    section 1, "The input path", states how close.
    """
    try:
        return _decode_image(raw, max_pixels, draft=draft)
    except UnusableImage as bad:
        raise InputError(f"{bad.reason}: {bad.detail}") from None


def _decode_image(raw: bytes, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """decode_image, raising UnusableImage (which the shard reader turns into a Reject)."""
    if not raw:
        raise UnusableImage(CORRUPT_IMAGE, "image member is empty (0 bytes)")
    try:
        # Our max_pixels is the limit; Pillow's warning (which fires at open,
        # before our check) would only be noise, its hard error is a reject.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=_PIL_FORMATS)
        width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnusableImage(IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... per plugin
        raise UnusableImage(CORRUPT_IMAGE, _stable(exc)) from None
    if width * height > max_pixels:
        raise UnusableImage(IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    try:
        if draft is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, (int(draft[0]), int(draft[1])))  # the JPEG DCT scale: the mode is kept
        image.load()
        return to_rgb(image)
    except Exception as exc:  # truncated or corrupt data surfaces only when decoding
        raise UnusableImage(CORRUPT_IMAGE, _stable(exc)) from None


def _stable(exc: Exception) -> str:
    """An exception as a reject's detail, without the object addresses Pillow puts in some messages
    ("cannot identify image file <_io.BytesIO object at 0x7f...>"), so two reads record the same."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


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
