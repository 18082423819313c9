"""Builders and checks shared by the test modules: `from helpers import write_tar, ...`
(tests/ is on sys.path through tests/conftest.py).

Images
- `encoded(image, fmt="PNG")` -> the bytes of a PIL image saved as `fmt`
- `image_bytes(fmt="JPEG", size=(8, 8), color=(200, 30, 30), mode="RGB")` -> a plain image, encoded
- `noise_images(sizes, seed=0)` -> PIL RGB images of random pixels, one per (height, width)
- `png_header(width, height)` -> a valid PNG claiming width x height pixels with almost no data (a bomb)

Tars (WebDataset shards)
- `tar_bytes(members)` / `write_tar(path, members, *, compress="")`: `members` are
  (member name, bytes) pairs, or (name, None, tarfile type) for links and other
  special members (linked to /etc/passwd); names are written as given (`../x.jpg`
  included), in GNU format; write_tar creates the parent folders.

CLI and stores
- `invoke(*args)` -> click's result of `mcad ARGS` (arguments turned into strings)
- `assert_one_line_error(result, *needles)` -> the one `mcad: error: ...` line of a refusal
- `leftovers(store)` -> the temporary files left anywhere in a store (a clean store has none)
"""
from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from mcad.jobs.cli import main
from mcad.storage.atomic import TMP_PREFIX

# A tqdm progress bar's counter and clock, e.g. "3/3 [00:01<00:00": not part of a message.
PROGRESS = re.compile(r"\d+/\d+ \[\d\d:\d\d")


# ------------------------------------------------------------------ images


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def image_bytes(fmt: str = "JPEG", size=(8, 8), color=(200, 30, 30), mode: str = "RGB") -> bytes:
    return encoded(Image.new(mode, size, color), fmt)


def noise_images(sizes, seed: int = 0) -> list[Image.Image]:
    """One RGB image of uniform random pixels per (height, width), drawn in order from one generator."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels but holds almost no data (a bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------ tars


def _add_members(tf: tarfile.TarFile, members) -> None:
    for member in members:
        name, data = member[0], member[1]
        info = tarfile.TarInfo(name)
        if len(member) > 2:  # a link or other special member
            info.type = member[2]
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add_members(tf, members)
    return buf.getvalue()


def write_tar(path: Path, members, *, compress: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:" + compress if compress else "w", format=tarfile.GNU_FORMAT) as tf:
        _add_members(tf, members)
    return path


# ------------------------------------------------------------------ CLI and stores


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2; exactly one line, `mcad: error: ...`, on stderr and nothing on stdout
    (progress bars aside); no traceback; every needle in that line. Returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == "", result.output
    # Progress bars (tqdm, on stderr, redrawn with \r) are not part of the message.
    lines = [line for line in result.output.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("mcad: error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(store: Path) -> list[str]:
    """Temporary files anywhere in a store: a clean store has none."""
    return sorted(str(p.relative_to(store)) for p in store.rglob(TMP_PREFIX + "*"))
