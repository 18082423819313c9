"""Finding a dataset's shards: a folder, a glob, a brace pattern, a list file, or a list of these.

    list_shards("data/{00000..00009}.tar")   # sorted absolute paths (or URIs)
    shard_name("/data/00003.tar")            # "00003": the shard's name in the store
"""
from __future__ import annotations

import os
import re
from typing import Sequence, Union

from braceexpand import braceexpand

from mcad.storage import fs
from mcad.storage.errors import InputError

ShardSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
_LIST_FILE_SUFFIXES = (".txt", ".lst", ".list")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_GLOB_CHARS = re.compile(r"[*?\[]")


def shard_name(path: str | os.PathLike) -> str:
    """The shard's name in the store: its file name without the tar suffix."""
    name = os.path.basename(os.fspath(path))
    for suffix in _TAR_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    stem, _ = os.path.splitext(name)
    return stem or name


def list_shards(spec: ShardSpec) -> list[str]:
    """Absolute paths of the shards `spec` names, sorted and de-duplicated.

    `spec` is a folder (its `*.tar` files; sidecars and dot-files ignored), a
    glob, a brace pattern, an existing file (a shard, or with a .txt/.lst/.list
    name a list of shard paths/patterns, one a line, `#` comments, relative to
    the list's folder), or a list/tuple of these. Non-tar files named
    explicitly are listed; `iter_shard` reports them as NOT_A_TAR.
    """
    return sorted(set(_resolve(spec, base=None)))


def _resolve(spec, *, base: str | None) -> list[str]:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("no shards given: the shard list is empty")
        return [path for item in spec for path in _resolve(item, base=base)]
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"a shard spec must be a path, a pattern or a list, not {type(spec).__name__}")
    text = os.fspath(spec).strip()
    text = text if fs.is_uri(text) else os.path.expanduser(text)
    if not text:
        raise InputError("no shards given: the shard spec is empty")
    if base is not None and not fs.is_uri(text) and not os.path.isabs(text):
        text = fs.join(base, text)
    if fs.is_dir(text):
        return _folder_shards(text)
    if fs.is_file(text):
        # Lines of a list file are shards or patterns, never further list files.
        if base is None and text.lower().endswith(_LIST_FILE_SUFFIXES):
            return _list_file_shards(text)
        return [fs.absolute(text)]
    return _pattern_shards(text)


def _folder_shards(folder: str) -> list[str]:
    paths = [fs.absolute(p) for p in fs.listdir(folder)
             if fs.name(p).endswith(".tar") and not fs.name(p).startswith(".")]
    paths = [p for p in paths if fs.is_file(p)]
    if not paths:
        raise InputError(f"no shards match {folder}: the folder has no *.tar files")
    return paths


def _list_file_shards(list_file: str) -> list[str]:
    try:
        lines = [line.strip() for line in fs.read_bytes(list_file).decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"shard list {list_file} is not UTF-8 text") from None
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise InputError(f"no shards match {list_file}: the list file names no shards")
    base = list_file.rsplit("/", 1)[0] if fs.is_uri(list_file) else os.path.dirname(os.path.abspath(list_file))
    return [path for entry in entries for path in _resolve(entry, base=base)]


def _pattern_shards(pattern: str) -> list[str]:
    try:
        expanded = list(braceexpand(pattern)) if "{" in pattern else [pattern]
    except ValueError as exc:
        raise InputError(f"bad brace pattern {pattern}: {exc}") from None
    paths: list[str] = []
    for item in expanded:
        if _GLOB_CHARS.search(item):
            paths += fs.glob(item)
        elif fs.is_dir(item):
            paths += _folder_shards(item)
        elif fs.is_file(item):
            paths.append(fs.absolute(item))
        else:  # an explicit path (plain or brace-expanded) must exist
            raise InputError(f"shard not found: {item}")
    if not paths:
        raise InputError(f"no shards match {pattern}")
    return paths
