"""The tar file under a shard read (pipeline/shards.py): how it is opened and watched, not what it holds.

Plain `tarfile` ends quietly on a tar cut at a header boundary or on a garbage
header; `WatchedTarInfo` watches the header reads (`TarInfo.fromtarfile`) and
leaves the reason on the TarFile (`tf.mcad_stop`), so the reader can tell a
real end-of-archive marker from a break. `Hashing` feeds every byte read to a
digest (the store's file digest, in the same single read); `plain_local_tar`
says when members can be skipped with seeks instead of read; `split_name` is
webdataset's key rule (`base_plus_ext`). Grouping the members into samples,
and the checks, stay in shards.py.
"""
from __future__ import annotations

import tarfile
import zlib

from webdataset.tariterators import base_plus_ext

from mcad.storage import fs

# What a broken or non-tar stream raises from tarfile and its decompressors.
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic


class WatchedTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why header reading stopped: tarfile ends quietly
    on a missing, short or garbage header, which for us is a broken tar."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.mcad_stop = exc
            raise


class Hashing:
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


def plain_local_tar(path: str, fh) -> bool:
    """A local file that is not compressed (its first bytes are no compressor's magic); fh rewound."""
    if fs.is_uri(path) or not hasattr(fh, "seek"):
        return False
    try:
        head = fh.read(6)
        fh.seek(0)
    except OSError:
        return False
    return len(head) > 0 and not head.startswith(_COMPRESSED)


def split_name(name: str) -> tuple[str, str]:
    """A member name as (key, lowercased suffix), webdataset's rule; no extension: (name, "")."""
    key, suffix = base_plus_ext(name)
    if key is None:  # no extension: its own key with no known member -> NO_IMAGE
        return name, ""
    return key, suffix.lower()
