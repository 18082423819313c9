"""storage/lock.py: one writer per store (real files, real pids; the passes themselves are in
tests/jobs/test_store_lock.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from mcad.storage import fs
from mcad.storage.errors import InputError
from mcad.storage.lock import Holder, acquire, incomplete_line, lock_path, read_holder
from mcad.storage.manifest import LOCK_NAME, PASS_CONFIG_NAME, STATUS_DONE, STATUS_PENDING, Manifest


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(store, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": dead_pid(), "since": "2026-11-30T10:00:00Z", **fields}
    os.makedirs(store, exist_ok=True)
    (store / LOCK_NAME).write_text(json.dumps(holder))


def test_one_holder_at_a_time_and_released(tmp_path):
    notes: list[str] = []
    store = tmp_path / "store"
    lock = acquire(store, take_dead=False, break_lock=False, say=notes.append)
    holder = read_holder(store)
    assert holder.pid == os.getpid() and holder.host == socket.gethostname() and holder.alive()
    # A second writer (this same live process counts as another pass) is refused, naming the holder.
    for flags in ({}, {"take_dead": True}, {"break_lock": True}):
        with pytest.raises(InputError, match=f"being written by another teacher pass \\(pid {os.getpid()} on "):
            acquire(store, **{"take_dead": False, "break_lock": False, **flags}, say=notes.append)
    lock.release()
    assert not (store / LOCK_NAME).exists() and notes == []
    lock.release()  # idempotent
    with acquire(store, take_dead=False, break_lock=False, say=notes.append):
        assert read_holder(store).pid == os.getpid()
    assert read_holder(store) is None


def test_a_dead_local_holder_is_taken_over_only_when_asked(tmp_path):
    store = tmp_path / "store"
    write_lock(store)
    gone = read_holder(store)
    assert gone.on_this_host() and not gone.alive()
    with pytest.raises(InputError, match=f"gone \\(pid {gone.pid} on .*--resume takes its lock over"):
        acquire(store, take_dead=False, break_lock=False, say=print)
    notes: list[str] = []
    lock = acquire(store, take_dead=True, break_lock=False, say=notes.append)
    assert len(notes) == 1 and f"took over the lock of a teacher pass that is gone (pid {gone.pid}" in notes[0]
    assert read_holder(store).pid == os.getpid()
    lock.release()
    assert os.listdir(store) == []  # nothing left aside


def test_a_reused_pid_is_not_the_holder(tmp_path):
    store = tmp_path / "store"
    write_lock(store, pid=os.getpid(), pid_start=1)  # our pid, but a process started at another time
    assert not read_holder(store).alive()
    acquire(store, take_dead=True, break_lock=False, say=lambda line: None).release()


def test_another_hosts_lock_needs_break_lock(tmp_path):
    store = tmp_path / "store"
    write_lock(store, host="elsewhere.invalid", pid=4242)
    with pytest.raises(InputError, match=r"another host \(pid 4242 on elsewhere.invalid, since 2026-11-30T10:00:00Z\)"
                                         r".*--break-lock"):
        acquire(store, take_dead=True, break_lock=False, say=print)
    notes: list[str] = []
    with acquire(store, take_dead=False, break_lock=True, say=notes.append):
        assert read_holder(store).host == socket.gethostname()
    assert len(notes) == 1 and "broke the lock" in notes[0] and "elsewhere.invalid" in notes[0]


def test_an_unreadable_lock_is_refused_and_broken_on_request(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / LOCK_NAME).write_text("{not json")
    with pytest.raises(InputError, match="unreadable.*--break-lock"):
        acquire(store, take_dead=True, break_lock=False, say=print)
    acquire(store, take_dead=False, break_lock=True, say=lambda line: None).release()


def test_file_uris_lock_exclusively_other_filesystems_warn(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    notes: list[str] = []
    with acquire(uri, take_dead=False, break_lock=False, say=notes.append):
        assert (tmp_path / "store" / LOCK_NAME).is_file() and notes == []
        with pytest.raises(InputError, match="being written by another teacher pass"):
            acquire(uri, take_dead=False, break_lock=False, say=notes.append)
    mock = f"mock:///{uuid.uuid4().hex}/store"
    with acquire(mock, take_dead=False, break_lock=False, say=notes.append):
        assert fs.is_file(lock_path(mock)) and read_holder(mock).pid == os.getpid()
        with pytest.raises(InputError, match="being written by another teacher pass"):
            acquire(mock, take_dead=False, break_lock=False, say=notes.append)
    assert not fs.exists(lock_path(mock))
    warnings = [n for n in notes if n.startswith("warning:")]
    assert len(warnings) == 2 and "not kept apart" in warnings[0] and "\n" not in warnings[0]


def test_incomplete_line_counts_shards_and_gives_the_resume_command(tmp_path):
    store = tmp_path / "my store"
    store.mkdir()
    m = Manifest()
    for i, status in enumerate([STATUS_DONE, STATUS_DONE, STATUS_PENDING, STATUS_PENDING]):
        m.shards[f"{i:05d}"] = {"status": status}
    line = incomplete_line(store, m)
    assert line == f"{store}: incomplete: 2 of 4 shards done; finish it with mcad pipeline teacher-pass ... " \
                   f"--out '{store}' --resume"
    config = {"data": "data/train", "dual": "t/dual", "single": "t/single", "out": "/elsewhere/store", "pool_size": 8,
              "topk": 3, "calibration_rows": 24, "pair_batch": 16}
    (store / PASS_CONFIG_NAME).write_text(json.dumps(config))
    write_lock(store, host="elsewhere.invalid", pid=7)
    line = incomplete_line(store, m)
    assert "incomplete: 2 of 4 shards done (a teacher pass holds its lock: pid 7 on elsewhere.invalid" in line
    assert line.endswith(f"finish it with mcad pipeline teacher-pass --data data/train --dual t/dual --single "
                         f"t/single --out '{store}' --pool 8 --topk 3 --calibration-rows 24 --resume")


def test_holder_str_names_host_pid_and_since():
    assert str(Holder(host="h", pid=1, since="2026-12-01T00:00:00Z")) == "pid 1 on h, since 2026-12-01T00:00:00Z"
