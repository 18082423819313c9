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
- `tar_sample_keys(path)` -> the sample keys of a shard by a plain `tarfile` walk, one per sample
  occurrence in tar order, up to where the tar breaks: a count independent of the shard reader

CLI and stores
- `invoke(*args)` -> click's result of `mcad ARGS` (arguments turned into strings)
- `assert_one_line_error(result, *needles)` -> the one `mcad: error: ...` line of a refusal
- `leftovers(store)` -> the temporary files left anywhere in a store (a clean store has none)

Damage and deliberate edits (a store's integrity checks: manifest digests, page checksums)
- `flip_byte(path, offset)` -> flips one bit of a file's byte in place, keeping its size and mtime
- `flip_in_pages(path, column, row_group=0)` -> the same inside the column chunk's last data page body
- `flip_in_footer(path)` -> the same inside a Parquet footer's created_by string: the footer still
  parses and every page decodes, so only the file's sha256 can tell
- `write_manifest(store, raw)` -> manifest.json from its raw fields, with its own digest recomputed
  (a deliberate edit, so that the check under test fires, not the digest's)
- `record_digests(store, *shards)` -> the manifest records the shards' files as they now are
- `strip_digests(store)` -> the store's manifest as written before the digests (none recorded)
"""
from __future__ import annotations

import io
import json
import os
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
from mcad.storage.manifest import (
    DIGEST_FIELDS, MANIFEST_NAME, MANIFEST_SHA256, REJECTS_DIR, SIGNALS_DIR, Manifest, file_record, manifest_digest, store_file,
)

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


# WebDataset's key: the member's folder and its name up to the first dot (webdataset's base_plus_ext).
_MEMBER_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_sample_keys(path: Path) -> list[str]:
    """The samples of a shard as a plain `tarfile` walk sees them, independently of mcad's shard reader:
    one key per sample occurrence (consecutive members sharing a key, a repeated suffix starting
    another), in tar order, up to where the tar breaks (tarfile lists no member whose header is cut);
    a file tarfile cannot open as a tar is one input, keyed by the shard's name."""
    keys, suffixes = [], set()
    try:
        tf = tarfile.open(path)
    except tarfile.ReadError:
        return [Path(path).name.split(".")[0]]
    with tf:
        try:
            for info in tf:
                match = _MEMBER_KEY.match(info.name)
                key, suffix = match.groups() if match else (info.name, "")
                if not keys or key != keys[-1] or suffix in suffixes:
                    keys.append(key)
                    suffixes = set()
                suffixes.add(suffix)
        except tarfile.ReadError:  # the data of the last member listed is cut
            pass
    return keys


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


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> int:
    """XOR one byte of a file with `mask`, keeping its size and mtime (so only a content check sees it);
    returns the new byte value."""
    stat = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0] ^ mask
        fh.seek(offset)
        fh.write(bytes([byte]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return byte


def flip_in_pages(path: Path, column: str, row_group: int = 0) -> None:
    """Flip a bit near the end of `column`'s chunk in a row group: inside its last data page's body."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(meta.column(j) for j in range(meta.num_columns)
                 if meta.column(j).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    flip_byte(path, start + chunk.total_compressed_size - 2)


def flip_in_footer(path: Path) -> None:
    """Flip a bit of the writer's name (created_by) in a Parquet file's footer: same size, still readable."""
    data = Path(path).read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "little")
    flip_byte(path, data.rindex(b"parquet-cpp-arrow", len(data) - 8 - footer_len) + 1)


def write_manifest(store: Path, raw: dict) -> None:
    """Write manifest.json from its raw fields with its own digest recomputed (a deliberate edit)."""
    fields = {key: value for key, value in raw.items() if key != MANIFEST_SHA256}
    (Path(store) / MANIFEST_NAME).write_text(json.dumps({**fields, MANIFEST_SHA256: manifest_digest(fields)}))


def strip_digests(store: Path) -> None:
    """Make a store look written before the digests: no file digests, no manifest_sha256."""
    raw = json.loads((Path(store) / MANIFEST_NAME).read_text())
    for entry in raw["shards"].values():
        for field in DIGEST_FIELDS:
            entry.pop(field, None)
    raw.pop(MANIFEST_SHA256, None)
    (Path(store) / MANIFEST_NAME).write_text(json.dumps(raw))


def record_digests(store: Path, *shards: str) -> None:
    """Record the shards' signals and rejects files, as they now are, in the store's manifest."""
    manifest = Manifest.load(store)
    for shard in shards:
        for folder in (SIGNALS_DIR, REJECTS_DIR):
            manifest.shards[shard].update(file_record(store_file(store, folder, f"{shard}.parquet"), folder))
    manifest.save(store)
