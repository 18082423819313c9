"""Crash-safe file writes: write a temporary file beside the target, fsync, rename.

A reader, or a rerun after a crash at any moment, sees either no file or a
complete one. Temporary names start with `.tmp-` so a resume can sweep them.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as exc:  # name the file we meant to write, not a random temporary name
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # e.g. ENOSPC from a write: say which file could not be written
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call fill(tmp) for a fresh temporary folder beside `path`, then put it in `path`'s place.

    A folder already at `path` is moved aside first and removed last, so a
    crash leaves either the old folder or the new one under `path` (or, at
    worst, the old one under `.old-<name>`), never a half-written one.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(TMP_PREFIX + path.name), path.with_name(".old-" + path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files a crashed writer left in `folder`; return what was removed."""
    folder = Path(folder)
    removed = sorted(folder.glob(TMP_PREFIX + "*")) if folder.is_dir() else []
    for tmp in removed:
        tmp.unlink()
    return removed
