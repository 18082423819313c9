"""Tolerant WebDataset input: read one shard as Samples and Rejects (pipeline/shard_list.py finds them).

The teacher pass and the student both read shards through `iter_shard`, so they
see the same samples in the same order. Every sample of a shard comes out as
exactly one item: a `Sample` (usable) or a `Reject` (key, reason, detail) that
the store records; nothing raises and nothing is dropped silently.

    from mcad.pipeline.shard_list import list_shards, shard_name
    from mcad.pipeline.shards import iter_shard
    for path in list_shards("data/{00000..00009}.tar"):
        for item in iter_shard(path):
            ...  # isinstance(item, Sample) or Reject

Why stdlib `tarfile` (streaming, `r|*`) and not webdataset's `group_by_keys`:
that raises on a repeated suffix (or, with a handler, skips it unrecorded) and
cannot say which sample a tar break cost, and we need one Reject per unusable
sample. Plain `tarfile` ends quietly on a tar cut at a header boundary or on a
garbage header; we watch the header reads (`TarInfo.fromtarfile`) to tell a
real end-of-archive marker from a break. webdataset's key rule
(`base_plus_ext`) and its `braceexpand` dependency are reused.

Rules for one shard (tar order, one member in memory at a time):
- Consecutive members with the same key (member path up to the first dot of
  the basename, as webdataset) form a sample; a suffix repeating inside such a
  run starts a new occurrence of the key. Suffixes are lowercased.
- Checks, first failure wins: name with `..`, absolute, or a link/special
  member (never used as a path) -> UNSAFE_MEMBER; key seen before in the shard
  (the first occurrence wins, whatever its fate) -> DUPLICATE_KEY; no
  jpg/jpeg/png/webp -> NO_IMAGE; txt not UTF-8 -> UNDECODABLE_TEXT; json not an
  object or caption(s) of the wrong type -> MALFORMED_JSON (even beside a good
  txt: a broken json means a broken sample); no caption -> NO_CAPTION; all
  captions blank -> EMPTY_CAPTION; width*height over `max_pixels` (from the
  header, before decoding) or Pillow's bomb error -> IMAGE_TOO_LARGE; zero-byte
  or undecodable image -> CORRUPT_IMAGE.
- Captions: txt first, then json `captions` (list of str) if present, else json
  `caption` (str); stripped, blanks and repeats dropped. `meta` = the json ({}).
- Image: the first of jpg, jpeg, png, webp, as RGB: transparency composited on
  white, 16-bit grey scaled to 8 bit, CMYK/palette/grey converted by Pillow.
- A broken tar (cut member or header, no end marker) keeps the samples before
  the break plus one TRUNCATED_TAR Reject keyed by the sample being read (or
  the shard name); a non-tar (or zero-byte) file yields one NOT_A_TAR Reject
  keyed by the shard name; an empty tar yields nothing. .tar.gz/bz2/xz work.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from PIL import Image
from webdataset.tariterators import base_plus_ext

from mcad.pipeline.images import to_rgb
from mcad.pipeline.shard_list import shard_name
from mcad.storage import fs
from mcad.storage.errors import InputError

CORRUPT_IMAGE = "corrupt_image"
NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
UNDECODABLE_TEXT = "undecodable_text"
MALFORMED_JSON = "malformed_json"
DUPLICATE_KEY = "duplicate_key"
IMAGE_TOO_LARGE = "image_too_large"
TRUNCATED_TAR = "truncated_tar"
NOT_A_TAR = "not_a_tar"
UNSAFE_MEMBER = "unsafe_member"
REASONS = (
    CORRUPT_IMAGE, NO_IMAGE, NO_CAPTION, EMPTY_CAPTION, UNDECODABLE_TEXT, MALFORMED_JSON,
    DUPLICATE_KEY, IMAGE_TOO_LARGE, TRUNCATED_TAR, NOT_A_TAR, UNSAFE_MEMBER,
)

# 8192 x 8192: far above web images (img2dataset usually resizes to <= 512) and
# below Pillow's own warning limit, so the decoded RGB stays under ~200 MB.
DEFAULT_MAX_PIXELS = 8192 * 8192
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
JSON_EXT = "json"
_READ_EXTS = frozenset(IMAGE_EXTS + (TEXT_EXT, JSON_EXT))
# Decoders we let Pillow try: the web formats (a .jpg may hold a PNG or GIF);
# nothing that calls out to external programs (EPS) or is rarely fuzzed.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO
# What a broken or non-tar stream raises from tarfile and its decompressors.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)



@dataclass(frozen=True)
class Sample:
    """A usable sample: RGB image (loaded), captions (>= 1, stripped), json meta."""

    key: str
    image: Image.Image
    captions: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return self.captions[0]


@dataclass(frozen=True)
class Reject:
    """A sample that cannot be used; `reason` is one of REASONS."""

    key: str
    reason: str
    detail: str


# ---------------------------------------------------------------- reading


class _Unusable(Exception):
    """Internal: why a sample is rejected; turned into a Reject at once."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why header reading stopped: tarfile ends quietly
    on a missing, short or garbage header, which for us is a broken tar."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.mcad_stop = exc
            raise


@dataclass
class _Group:
    """The members of one sample occurrence, as read from the tar."""

    key: str
    suffixes: set = field(default_factory=set)
    data: dict = field(default_factory=dict)  # known suffix -> bytes
    unsafe: list = field(default_factory=list)


def iter_shard(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               digest=None) -> Iterator[Sample | Reject]:
    """Stream one shard: a Sample or a Reject per sample, in tar order.

    Raises InputError only when the file itself cannot be opened (missing,
    unreadable); everything wrong inside it becomes a Reject. `digest` (a
    hashlib object, e.g. sha256) is fed every byte of the file as it is read,
    in the same single read: once the iterator is exhausted it holds the
    whole file's digest (the bytes after the tar's end marker are read too).
    """
    path = os.fspath(path)
    name = shard_name(path)
    try:
        fh = fs.open_stream(path)
    except OSError as exc:
        raise InputError(f"cannot read shard {path}: {getattr(exc, 'strerror', None) or exc}") from None
    with fh:
        src = fh if digest is None else _Hashing(fh, digest)
        try:
            tf = tarfile.open(fileobj=src, mode="r|*", tarinfo=_WatchedTarInfo)
        except _TAR_ERRORS as exc:
            yield Reject(name, NOT_A_TAR, f"{path}: {exc}")
        else:
            seen: set[str] = set()
            for group in _read_groups(tf, name):
                yield group if isinstance(group, Reject) else _to_item(group, seen, max_pixels)
        if digest is not None:
            src.drain()


class _Hashing:
    """A read-only stream that feeds what is read through it to a hashlib object."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what is left: the tar's padding after its end marker, or what a break left."""
        while self.read(1 << 20):
            pass


def _read_groups(tf: tarfile.TarFile, shard: str) -> Iterator[_Group | Reject]:
    current: _Group | None = None
    try:
        while (info := tf.next()) is not None:
            # Streaming mode still appends every header to tf.members; drop them
            # so a long shard does not grow memory (webdataset does the same).
            tf.members = []
            if info.isdir():
                continue
            key, suffix = _split_name(info.name)
            if current is None or key != current.key or suffix in current.suffixes:
                if current is not None:
                    yield current
                current = _Group(key)
            _add_member(tf, current, info, suffix)
    except _TAR_ERRORS as exc:
        yield _truncated(current, shard, f"tar breaks: {type(exc).__name__}: {exc}")
        return
    stop = getattr(tf, "mcad_stop", None)
    if not isinstance(stop, tarfile.EOFHeaderError):
        yield _truncated(current, shard, f"tar ends without an end-of-archive marker ({stop})")
        return
    if current is not None:
        yield current


def _truncated(current: _Group | None, shard: str, detail: str) -> Reject:
    # The sample being read at the break may be missing members: reject it.
    return Reject(current.key if current else shard, TRUNCATED_TAR, detail)


def _split_name(name: str) -> tuple[str, str]:
    key, suffix = base_plus_ext(name)
    if key is None:  # no extension: its own key with no known member -> NO_IMAGE
        return name, ""
    return key, suffix.lower()


def _add_member(tf: tarfile.TarFile, group: _Group, info: tarfile.TarInfo, suffix: str) -> None:
    group.suffixes.add(suffix)
    parts = PurePosixPath(info.name.replace("\\", "/")).parts
    if info.name.startswith(("/", "\\")) or ".." in parts:
        group.unsafe.append(f"member name {info.name!r} escapes the shard")
    elif not info.isreg():
        group.unsafe.append(f"member {info.name!r} is a link or special file")
    elif suffix in _READ_EXTS:
        group.data[suffix] = tf.extractfile(info).read()


def _to_item(group: _Group, seen: set[str], max_pixels: int) -> Sample | Reject:
    key = group.key
    try:
        if group.unsafe:
            raise _Unusable(UNSAFE_MEMBER, "; ".join(group.unsafe))
        if key in seen:
            raise _Unusable(DUPLICATE_KEY, "the key occurred earlier in this shard; the first is used")
        seen.add(key)
        image_ext = next((ext for ext in IMAGE_EXTS if ext in group.data), None)
        if image_ext is None:
            raise _Unusable(NO_IMAGE, f"no {'/'.join(IMAGE_EXTS)} member; members: {sorted(group.suffixes)}")
        captions, meta = _read_captions(group.data)
        image = _decode_image(group.data[image_ext], max_pixels)
    except _Unusable as bad:
        return Reject(key, bad.reason, bad.detail)
    return Sample(key=key, image=image, captions=captions, meta=meta)


def _read_captions(data: dict) -> tuple[tuple[str, ...], dict]:
    texts: list[str] = []
    if TEXT_EXT in data:
        try:
            texts.append(data[TEXT_EXT].decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise _Unusable(UNDECODABLE_TEXT, f"txt is not UTF-8: {exc}") from None
    meta: dict = {}
    if JSON_EXT in data:
        meta = _parse_json(data[JSON_EXT])
        if meta.get("captions") is not None:
            texts += meta["captions"]
        elif meta.get("caption") is not None:
            texts.append(meta["caption"])
    if not texts:
        raise _Unusable(NO_CAPTION, "no txt member and no json caption/captions")
    captions = tuple(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not captions:
        raise _Unusable(EMPTY_CAPTION, f"every caption is empty or whitespace: {texts!r}"[:200])
    return captions, meta


def _parse_json(raw: bytes) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _Unusable(MALFORMED_JSON, f"json does not parse: {exc}") from None
    if not isinstance(meta, dict):
        raise _Unusable(MALFORMED_JSON, f"json is a {type(meta).__name__}, not an object")
    captions, caption = meta.get("captions"), meta.get("caption")
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise _Unusable(MALFORMED_JSON, "json 'captions' is not a list of strings")
    if caption is not None and not isinstance(caption, str):
        raise _Unusable(MALFORMED_JSON, "json 'caption' is not a string")
    return meta


def _decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    if not raw:
        raise _Unusable(CORRUPT_IMAGE, "image member is empty (0 bytes)")
    try:
        # Our max_pixels is the limit; Pillow's warning (which fires at open,
        # before our check) would only be noise, its hard error is a reject.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=_PIL_FORMATS)
        width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Unusable(IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... per plugin
        raise _Unusable(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None
    if width * height > max_pixels:
        raise _Unusable(IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    try:
        image.load()
        return to_rgb(image)
    except Exception as exc:  # truncated or corrupt data surfaces only when decoding
        raise _Unusable(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None
