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

Here: the items (Sample, EncodedSample, MemberRef, Reject), the reject
reasons (REASONS), `iter_shard`, the grouping of members into samples and the
checks. Beside it: pipeline/images.py decodes images (`decode_image`; the two
image reasons, CORRUPT_IMAGE and IMAGE_TOO_LARGE, are defined there),
pipeline/tar_stream.py opens and watches the tar file, pipeline/read_ahead.py
reads the next pools in a background thread.

Why stdlib `tarfile` (streaming, `r|*`) and not webdataset's `group_by_keys`:
that raises on a repeated suffix (or, with a handler, skips it unrecorded) and
cannot say which sample a tar break cost, and we need one Reject per unusable
sample. Plain `tarfile` ends quietly on a tar cut at a header boundary or on a
garbage header; we watch the header reads (tar_stream.py) to tell a real
end-of-archive marker from a break. webdataset's key rule (`base_plus_ext`)
and its `braceexpand` dependency are reused.

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
- Image: the first of jpg, jpeg, png, webp, as RGB (images.py): transparency
  composited on white, 16-bit grey scaled to 8 bit, CMYK/palette/grey converted
  by Pillow.
- A broken tar (cut member or header, no end marker) keeps the samples before
  the break plus one TRUNCATED_TAR Reject keyed by the sample being read (or
  the shard name); a non-tar (or zero-byte) file yields one NOT_A_TAR Reject
  keyed by the shard name; an empty tar yields nothing. .tar.gz/bz2/xz work.

Decoding (the costly part with web photos) can move off the reading thread:
`iter_shard(..., decode_threads=N)` decodes in N threads (Pillow releases the
GIL while it decodes), in order, the same items as a serial read; `read_ahead`
(read_ahead.py) reads, decodes and prepares the next pools in a background
thread while the caller works on the current one (the teacher pass);
`decode=False` yields `EncodedSample`s whose image is decoded only when asked
for (the student's loader decodes just the batches it builds), optionally in
JPEG draft mode.
From a local uncompressed tar (and no digest to feed) those samples only
point at their image's bytes (`MemberRef`): a reader that decodes one batch
in N reads the headers and captions of the others, not their images.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from PIL import Image

# The image reasons and the size limit belong to decoding (images.py); REASONS lists them with the rest.
from mcad.pipeline.images import CORRUPT_IMAGE, DEFAULT_MAX_PIXELS, IMAGE_TOO_LARGE, UnusableImage, _decode_image
from mcad.pipeline.shard_list import shard_name
from mcad.pipeline.tar_stream import TAR_ERRORS, Hashing, WatchedTarInfo, plain_local_tar, split_name
from mcad.storage import fs
from mcad.storage.errors import InputError

NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
UNDECODABLE_TEXT = "undecodable_text"
MALFORMED_JSON = "malformed_json"
DUPLICATE_KEY = "duplicate_key"
TRUNCATED_TAR = "truncated_tar"
NOT_A_TAR = "not_a_tar"
UNSAFE_MEMBER = "unsafe_member"
REASONS = (
    CORRUPT_IMAGE, NO_IMAGE, NO_CAPTION, EMPTY_CAPTION, UNDECODABLE_TEXT, MALFORMED_JSON,
    DUPLICATE_KEY, IMAGE_TOO_LARGE, TRUNCATED_TAR, NOT_A_TAR, UNSAFE_MEMBER,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
JSON_EXT = "json"
_READ_EXTS = frozenset(IMAGE_EXTS + (TEXT_EXT, JSON_EXT))


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
class MemberRef:
    """Where a tar member's bytes lie in a local file: read (one pread) only when asked for."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                data = os.pread(fh.fileno(), self.size, self.offset)
        except OSError as exc:
            raise InputError(f"cannot read shard {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        if len(data) != self.size:
            raise InputError(f"shard {self.path}: a member of {self.size} bytes at {self.offset} is cut short "
                             f"(the file changed after it was listed)")
        return data


@dataclass(frozen=True)
class EncodedSample:
    """A sample whose image is still encoded (`iter_shard(..., decode=False)`): its captions are
    checked, its image is not. `image` decodes it on every access; `decoded(draft=)` returns
    the Sample. Readers that know from a store which samples were kept use it to decode only
    what they show (a corrupt image raises InputError naming the key). `encoded` holds the
    image member's bytes, or where to read them (MemberRef)."""

    key: str
    encoded: bytes | MemberRef
    captions: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return self.captions[0]

    @property
    def data(self) -> bytes:
        """The image member's bytes (read now when the sample holds only where they are)."""
        return self.encoded.read() if isinstance(self.encoded, MemberRef) else self.encoded

    @property
    def image(self) -> Image.Image:
        return self.decoded().image

    def decoded(self, draft: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
        """The Sample, its image decoded (with `draft`, at the smallest JPEG scale whose size covers
        `draft` in both dimensions: see pipeline/images.py's decode_image)."""
        try:
            image = _decode_image(self.data, max_pixels, draft=draft)
        except UnusableImage as bad:
            raise InputError(f"sample {self.key}: {bad.reason}: {bad.detail}") from None
        return Sample(key=self.key, image=image, captions=self.captions, meta=self.meta)


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


@dataclass
class _Group:
    """The members of one sample occurrence, as read from the tar."""

    key: str
    suffixes: set = field(default_factory=set)
    data: dict = field(default_factory=dict)  # known suffix -> bytes
    unsafe: list = field(default_factory=list)


def iter_shard(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               digest=None, decode: bool = True, decode_threads: int = 0) -> Iterator[Sample | Reject]:
    """Stream one shard: a Sample or a Reject per sample, in tar order.

    Raises InputError only when the file itself cannot be opened (missing,
    unreadable); everything wrong inside it becomes a Reject. `digest` (a
    hashlib object, e.g. sha256) is fed every byte of the file as it is read,
    in the same single read: once the iterator is exhausted it holds the
    whole file's digest (the bytes after the tar's end marker are read too).
    decode_threads > 0: images are decoded by that many threads, a few
    samples ahead of the reader; the items are the same, in the same order.
    decode=False: EncodedSamples instead of Samples, images neither decoded
    nor checked (the image rejects are left to whoever decodes them).
    """
    path = os.fspath(path)
    name = shard_name(path)
    try:
        fh = fs.open_stream(path)
    except OSError as exc:
        raise InputError(f"cannot read shard {path}: {getattr(exc, 'strerror', None) or exc}") from None
    with fh:
        src = fh if digest is None else Hashing(fh, digest)
        # Images only referenced (MemberRef): a local, uncompressed tar that nothing hashes, read with
        # seeks (mode "r:") so the members' data is skipped, not read; else one front-to-back stream.
        refs = path if not decode and digest is None and plain_local_tar(path, fh) else None
        try:
            tf = tarfile.open(fileobj=src, mode="r:" if refs else "r|*", tarinfo=WatchedTarInfo)
        except TAR_ERRORS as exc:
            yield Reject(name, NOT_A_TAR, f"{path}: {exc}")
        else:
            seen: set[str] = set()
            checked = (group if isinstance(group, Reject) else _check(group, seen)
                       for group in _read_groups(tf, name, refs))
            if not decode:
                yield from checked
            elif decode_threads > 0:
                yield from _decode_in_threads(checked, decode_threads, max_pixels)
            else:
                yield from (_finish(item, max_pixels) for item in checked)
        if digest is not None:
            src.drain()


def _decode_in_threads(checked: Iterator, threads: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """_finish over `checked` by a pool of threads, in order, at most 2 x threads ahead of the caller."""
    window: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="mcad-decode") as pool:
        for item in checked:
            window.append(pool.submit(_finish, item, max_pixels))
            while len(window) > 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _read_groups(tf: tarfile.TarFile, shard: str, refs: str | None = None) -> Iterator[_Group | Reject]:
    current: _Group | None = None
    try:
        while (info := tf.next()) is not None:
            # Streaming mode still appends every header to tf.members; drop them
            # so a long shard does not grow memory (webdataset does the same).
            tf.members = []
            if info.isdir():
                continue
            key, suffix = split_name(info.name)
            if current is None or key != current.key or suffix in current.suffixes:
                if current is not None:
                    yield current
                current = _Group(key)
            _add_member(tf, current, info, suffix, refs)
    except TAR_ERRORS as exc:
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


def _add_member(tf: tarfile.TarFile, group: _Group, info: tarfile.TarInfo, suffix: str,
                refs: str | None = None) -> None:
    group.suffixes.add(suffix)
    parts = PurePosixPath(info.name.replace("\\", "/")).parts
    if info.name.startswith(("/", "\\")) or ".." in parts:
        group.unsafe.append(f"member name {info.name!r} escapes the shard")
    elif not info.isreg():
        group.unsafe.append(f"member {info.name!r} is a link or special file")
    elif refs is not None and suffix in IMAGE_EXTS:
        group.data[suffix] = MemberRef(refs, info.offset_data, info.size)
    elif suffix in _READ_EXTS:
        group.data[suffix] = tf.extractfile(info).read()


def _check(group: _Group, seen: set[str]) -> EncodedSample | Reject:
    """Every check but decoding, in the order of the module doc (first failure wins): the sample with
    its image still encoded, or its Reject."""
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
    except _Unusable as bad:
        return Reject(key, bad.reason, bad.detail)
    return EncodedSample(key, group.data[image_ext], captions, meta)


def _finish(item: EncodedSample | Reject, max_pixels: int) -> Sample | Reject:
    """Decode a checked sample's image: the Sample, or the image's Reject."""
    if isinstance(item, Reject):
        return item
    try:
        image = _decode_image(item.data, max_pixels)
    except UnusableImage as bad:
        return Reject(item.key, bad.reason, bad.detail)
    return Sample(key=item.key, image=image, captions=item.captions, meta=item.meta)


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
