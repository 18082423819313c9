"""Where files live: a local path, or a URI of any pyarrow filesystem (s3://, gs://, hdfs://, file://).

Data shards and signal stores may live on shared object storage, so a cluster's
nodes read and write them without a shared disk. Locations are plain strings;
these few functions are the only place that tells a local path from a URI:

- a local path goes through `os` and `pathlib` as before (atomic renames);
- a URI goes through `pyarrow.fs.FileSystem.from_uri` (credentials come from
  the usual environment of each node). Object stores have no rename; a file
  written there appears whole when its upload completes, which is the same
  promise the local temp + rename gives.

    fs.join("s3://bucket/store", "signals", "00000.parquet")
    with fs.open_input("gs://bucket/data/00000.tar") as fh: ...
"""
from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import re
from pathlib import Path
from typing import IO, Callable

import pyarrow.fs as pafs

from mcad.storage.errors import InputError, error_line

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


@functools.lru_cache(maxsize=None)
def _filesystem(prefix: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of its root) per scheme://authority and process: clients are reused."""
    try:
        return pafs.FileSystem.from_uri(prefix + "/")
    except (ValueError, OSError) as exc:  # unknown scheme, or a backend this pyarrow lacks
        raise InputError(f"cannot open {prefix}: {error_line(exc)}") from None


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A URI -> (its pyarrow filesystem, the path inside it)."""
    scheme, rest = uri.split("://", 1)
    authority, _, path = rest.partition("/")
    fs, root = _filesystem(f"{scheme}://{authority}")  # root: "bucket" (s3, gs), "/" (file, hdfs), "" (mock)
    path = path.strip("/")
    if not path:
        return fs, root
    return fs, f"{root.rstrip('/')}/{path}" if root else path


def join(location: str | os.PathLike, *parts: str) -> str:
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return os.path.join(os.fspath(location), *parts)


def name(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/")) if is_uri(location) else Path(location).name


def absolute(location: str | os.PathLike) -> str:
    return str(location) if is_uri(location) else os.path.abspath(os.path.expanduser(os.fspath(location)))


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File if is_uri(location) else os.path.isfile(location)


def is_dir(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.Directory if is_uri(location) else os.path.isdir(location)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound if is_uri(location) else os.path.exists(location)


def size_and_mtime(location: str | os.PathLike) -> tuple[int, float]:
    """(bytes, modification time in seconds); FileNotFoundError when absent."""
    if not is_uri(location):
        st = os.stat(location)
        return st.st_size, st.st_mtime
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(location)
    return int(info.size), info.mtime.timestamp() if info.mtime else 0.0


def listdir(location: str | os.PathLike) -> list[str]:
    """Full locations of a folder's entries (files and folders); [] when it does not exist."""
    if not is_uri(location):
        return [os.path.join(location, n) for n in os.listdir(location)] if os.path.isdir(location) else []
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [join(location, i.base_name) for i in infos]


def require_empty(location: str | os.PathLike, advice: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to start a new output in a folder (or URI prefix) that holds anything.

    The one guard of every job that writes a folder: a job calls it unless it
    continues what is there (resume). InputError "<location> is not empty; <advice>".
    `ignore`: entry names that do not count (the job's own lock file).
    """
    if [p for p in listdir(location) if name(p) not in ignore]:
        raise InputError(f"{location} is not empty; {advice}")


def glob(pattern: str) -> list[str]:
    """Files matching a pattern whose wildcards are in the last part (URIs); any glob (local)."""
    if not is_uri(pattern):
        import glob as _glob

        return [os.path.abspath(p) for p in _glob.glob(pattern) if os.path.isfile(p)]
    folder, _, leaf = pattern.rstrip("/").rpartition("/")
    if any(c in folder.split("://", 1)[1] for c in "*?["):
        raise InputError(f"{pattern}: in a URI only the file name may hold wildcards")
    return [p for p in listdir(folder) if fnmatch.fnmatchcase(name(p), leaf) and is_file(p)]


def open_input(location: str | os.PathLike) -> IO[bytes]:
    """A readable, seekable binary file."""
    if not is_uri(location):
        return open(location, "rb")
    fs, path = resolve(location)
    return fs.open_input_file(path)


def open_stream(location: str | os.PathLike) -> IO[bytes]:
    """A readable binary stream, read front to back (a tar shard): no seeks, fewer requests."""
    if not is_uri(location):
        return open(location, "rb")
    fs, path = resolve(location)
    return fs.open_input_stream(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_input(location) as fh:
        return fh.read()


def write_file(location: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a whole file that readers see complete or not at all (local: temp + fsync + rename)."""
    if not is_uri(location):
        from mcad.storage.atomic import atomic_write

        def to_path(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                write(fh)

        atomic_write(location, to_path)
        return
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:  # an object appears when its upload completes
        write(out)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    write_file(location, lambda fh: fh.write(data))


def write_json(location: str | os.PathLike, obj) -> None:
    """JSON (indented, sorted keys) written as one whole file."""
    import json

    write_bytes(location, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def makedirs(location: str | os.PathLike) -> None:
    if is_uri(location):
        fs, path = resolve(location)
        fs.create_dir(path, recursive=True)
    else:
        os.makedirs(location, exist_ok=True)


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
    elif is_file(location):
        fs, path = resolve(location)
        fs.delete_file(path)


def remove_tree(location: str | os.PathLike) -> None:
    """Delete a folder and everything in it, if it exists."""
    if not is_uri(location):
        import shutil

        shutil.rmtree(location, ignore_errors=True)
    elif is_dir(location):
        fs, path = resolve(location)
        fs.delete_dir(path)
