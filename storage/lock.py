"""One writer per store: the teacher pass's lock file, `STORE/pass.lock` (manifest.LOCK_NAME).

A teacher pass (fresh, --resume or --overwrite) holds the lock for its whole
run. The file is created atomically, and only when it does not exist yet
(local paths and file:// URIs: `os.open(O_CREAT | O_EXCL)`), and holds the
holder's host, pid and start time as JSON. It is removed when the pass ends,
also on failure; a driver killed with SIGKILL leaves it behind.

A second writer is refused, naming the holder. A lock whose holder is gone
can be taken:

- a dead process on this host (its pid no longer runs, or now belongs to a
  process started later): `take_dead=True` (the pass's --resume and
  --overwrite) takes it over and says so in one line;
- a holder on another host cannot be checked from here: only `break_lock=True`
  (the pass's --break-lock) takes it, and says so.

At a URI of another filesystem (s3://, gs://, hdfs://, mock://) pyarrow offers
no conditional create: the lock is written there after a check that none
exists (it stops a second pass started later, the common case), and one
warning line says that two passes started at the same moment are not kept
apart there.

    lock = acquire(store, take_dead=True, break_lock=False, say=print)
    try:
        ...  # write the store
    finally:
        lock.release()
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

from mcad.storage import fs
from mcad.storage.atomic import TMP_PREFIX
from mcad.storage.errors import InputError
from mcad.storage.manifest import LOCK_NAME, PASS_CONFIG_NAME, store_file
from mcad.storage.schema import PASS_POOLS, POOLS_CONSECUTIVE

_READ_WAIT_S = 2.0  # a lock just created may be read before its holder has written it


@dataclass(frozen=True)
class Holder:
    """Who holds a store's lock. `pid_start`: the process's start time in clock ticks after
    boot (Linux /proc), so a pid reused by a later process is not taken for the holder."""

    host: str
    pid: int
    since: str
    pid_start: int | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder still runs; only asked of a holder on this host."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            pass
        started = _pid_start(self.pid)
        return self.pid_start is None or started is None or started == self.pid_start


class StoreLock:
    """A held lock; `release()` removes the file if it is still ours (idempotent)."""

    def __init__(self, location: str, holder: Holder):
        self.location, self.holder = location, holder

    def release(self) -> None:
        if self.holder is None:
            return
        try:
            if _read(self.location, wait=False) == self.holder:  # not ours once it was broken
                _remove(self.location)
        except (InputError, OSError):
            pass
        self.holder = None

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(store: str | os.PathLike) -> str:
    return str(store_file(store, LOCK_NAME))


def read_holder(store: str | os.PathLike) -> Holder | None:
    """The holder of a store's lock, None when it has none (or its file is unreadable)."""
    try:
        return _read(lock_path(store), wait=False)
    except (InputError, OSError):
        return None


def acquire(store: str | os.PathLike, *, take_dead: bool, break_lock: bool,
            say: Callable[[str], None]) -> StoreLock:
    """Take the store's lock or raise InputError (one line naming the holder).

    take_dead: take over a lock whose holder ran on this host and is gone.
    break_lock: take any lock but that of a live process on this host.
    say: how one-line notes (a lock taken over, an unguarded URI) reach the user.
    """
    location = lock_path(store)
    exclusive = _local(location) is not None
    if not exclusive:
        filesystem = fs.resolve(location)[0].type_name
        say(f"warning: {store}: pyarrow's {filesystem} filesystem offers no conditional create, so its lock "
            f"is only checked, not exclusive: two teacher passes started at the same moment are not kept apart")
    for _ in range(8):  # each round either takes the lock, refuses, or removes a lock that is gone
        holder = _new_holder()
        if _create(location, holder, exclusive):
            return StoreLock(location, holder)
        try:
            found = _read(location, wait=True)
        except InputError as exc:
            if not break_lock:
                raise InputError(f"{store}: {exc}; if no teacher pass writes this store, rerun with "
                                 f"--break-lock") from None
            say(f"{store}: removed an unreadable lock file (--break-lock)")
            _remove(location)
            continue
        if found is None:  # released meanwhile
            continue
        if found.on_this_host():
            if found.alive():
                raise InputError(f"{store} is being written by another teacher pass ({found}); "
                                 f"wait for it to finish")
            if not (take_dead or break_lock):
                raise InputError(f"{store} is locked by a teacher pass that is gone ({found}); "
                                 f"--resume takes its lock over")
            if _take(location, found):
                say(f"{store}: took over the lock of a teacher pass that is gone ({found})")
            continue
        if not break_lock:
            raise InputError(f"{store} is locked by a teacher pass on another host ({found}); "
                             f"if that pass is gone, rerun with --break-lock")
        if _take(location, found):
            say(f"{store}: broke the lock of a teacher pass on another host ({found}) (--break-lock)")
    raise InputError(f"{store}: could not take its lock ({location}): other passes keep taking it")


# ------------------------------------------------------------------ files


def _local(location: str) -> str | None:
    """The local path of a lock at a local path or a file:// URI; None on other filesystems."""
    if not fs.is_uri(location):
        return location
    import pyarrow.fs as pafs

    filesystem, path = fs.resolve(location)
    return path if isinstance(filesystem, pafs.LocalFileSystem) else None


def _encode(holder: Holder) -> bytes:
    return (json.dumps(asdict(holder), sort_keys=True) + "\n").encode()


def _create(location: str, holder: Holder, exclusive: bool) -> bool:
    """Create the lock file holding `holder`; False when a lock file is already there."""
    path = _local(location)
    if not exclusive:
        if fs.exists(location):
            return False
        fs.write_bytes(location, _encode(holder))
        return _read(location, wait=False) == holder  # a writer that raced us last wins; only one goes on
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, _encode(holder))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return True


def _read(location: str, *, wait: bool) -> Holder | None:
    """The lock's holder; None when there is no lock. InputError when it stays unreadable
    (with wait, for a moment: the file may have just been created and not written yet)."""
    deadline = time.monotonic() + (_READ_WAIT_S if wait else 0.0)
    while True:
        try:
            raw = fs.read_bytes(location)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw.decode())
            return Holder(host=str(data["host"]), pid=int(data["pid"]), since=str(data["since"]),
                          pid_start=data.get("pid_start"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if time.monotonic() >= deadline:
                raise InputError(f"its lock file {location} is unreadable ({len(raw)} bytes)") from None
            time.sleep(0.05)


def _remove(location: str) -> None:
    path = _local(location)
    if path is None:
        fs.remove(location)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _take(location: str, gone: Holder) -> bool:
    """Remove a lock whose holder is gone, unless another pass replaced it meanwhile."""
    path = _local(location)
    if path is None:  # no rename to rely on: check and remove
        if _read(location, wait=False) == gone:
            fs.remove(location)
            return True
        return False
    # Move it aside first (one rename wins), then make sure it was the lock we judged.
    aside = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{LOCK_NAME}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if _read(aside, wait=False) == gone:
            return True
        try:  # a live pass's lock, created after we judged: put it back
            os.link(aside, path)
        except FileExistsError:
            pass
        return False
    finally:
        os.unlink(aside)


def _new_holder() -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(),
                  since=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  pid_start=_pid_start(os.getpid()))


def _pid_start(pid: int) -> int | None:
    """Start time of a process in clock ticks after boot (/proc/PID/stat, field 22); None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ an unfinished store

# The resume command's flags for the saved teacher-pass job's fields (TeacherPassJob): --resume
# refuses other teachers, P, K or calibration rows, so the command repeats them.
_RESUME_FLAGS = (("data", "--data"), ("dual", "--dual"), ("single", "--single"),
                 ("pool_size", "--pool"), ("topk", "--topk"), ("calibration_rows", "--calibration-rows"))
_VIEW_FLAGS = (("views", "--views"), ("single_views", "--single-views"), ("crop_scale", "--crop-scale"),
               ("crop_ratio", "--crop-ratio"), ("seed", "--seed"))


def incomplete_line(store: str | os.PathLike, manifest) -> str:
    """The one line for a store whose pass has not finished: how far it got, who holds its lock, and
    the command that finishes it (from the pass's saved config; `...` where that is unreadable)."""
    done, total = len(manifest.done_shards()), len(manifest.shards)
    holder = read_holder(store)
    if holder is None:
        lock = ""
    elif holder.on_this_host() and not holder.alive():
        lock = f" (the pass that held its lock is gone: {holder})"
    else:
        lock = f" (a teacher pass holds its lock: {holder}; wait for it to finish)"
    return f"{store}: incomplete: {done} of {total} shards done{lock}; finish it with {resume_command(store)}"


def resume_command(store: str | os.PathLike) -> str:
    """`mcad pipeline teacher-pass ... --out STORE --resume` for a store, the rest from its saved
    teacher-pass config (`...` where that is unreadable). --out is the store as named here: it may
    have been moved or copied since."""
    import shlex

    try:
        saved = json.loads(fs.read_bytes(store_file(store, PASS_CONFIG_NAME)).decode())
        args = [a for key, flag in _RESUME_FLAGS for a in (flag, str(saved[key]))]
        if saved.get("views", 1) > 1:  # a pass with views (schema v2) resumes only with its own view recipe
            for key, flag in _VIEW_FLAGS:
                value = saved[key]
                args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        if saved.get(PASS_POOLS, POOLS_CONSECUTIVE) != POOLS_CONSECUTIVE:  # ... and its own pool mode (issue #18)
            args += ["--pools", str(saved[PASS_POOLS])]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        args = ["..."]
    return shlex.join(["mcad", "pipeline", "teacher-pass", *args[:6], "--out", str(store), *args[6:], "--resume"])
