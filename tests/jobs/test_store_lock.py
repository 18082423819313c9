"""One writer per store, an unfinished store, and --verify-data, through the real `mcad` commands
(issue #19). Two passes started at the same moment, and a driver SIGKILLed mid-pass, are in
tests/jobs/test_fault_crashes.py (they need processes of their own).

- a lock left by a dead pid on this host: --resume takes it over, saying so in one line;
- a lock from another host: refused (one line naming it) without --break-lock, taken with it;
- a store whose manifest still has pending shards: train-student, sweep and validate give the
  one `incomplete: N of M shards done; finish it with ...` line, and that command finishes it;
- --verify-data: passes on a good store, refuses a tar rewritten with its size and mtime kept.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest

from helpers import assert_one_line_error, invoke
from mcad.storage.manifest import (
    LOCK_NAME, MANIFEST_NAME, SOURCE, SOURCE_SHA256, STATUS, STATUS_PENDING, Manifest, file_digest, rejects_path,
    signals_path,
)

pytestmark = pytest.mark.ray


def pass_args(shapes_data, tiny_teachers, tiny_pass, out, *extra) -> list:
    dual, single = tiny_teachers
    return ["pipeline", "teacher-pass", "--data", shapes_data / "train", "--dual", dual, "--single", single,
            "--out", out, "--pool", tiny_pass["pool_size"], "--topk", tiny_pass["topk"],
            "--calibration-rows", tiny_pass["calibration_rows"], *extra]


def student_args(store, data, run, *extra) -> list:
    return ["pipeline", "train-student", "--store", store, "--data", data, "--out", run,
            "--preset", "smoke", "--epochs", 1, *extra]


def write_lock(store, **fields) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is free now
    holder = {"host": socket.gethostname(), "pid": proc.pid, "since": "2026-11-30T10:00:00Z", **fields}
    (store / LOCK_NAME).write_text(json.dumps(holder))
    return holder


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    return out


def test_resume_takes_over_a_dead_local_pass_lock(store_copy, shapes_data, tiny_teachers, tiny_pass):
    holder = write_lock(store_copy)
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, store_copy)
    # A fresh pass is not a continuation: it is refused, pointing at --resume.
    assert_one_line_error(invoke(*args), f"locked by a teacher pass that is gone (pid {holder['pid']} on ",
                          "--resume takes its lock over")
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "took over" in line]
    assert notes == [f"mcad: {store_copy}: took over the lock of a teacher pass that is gone "
                     f"(pid {holder['pid']} on {holder['host']}, since {holder['since']})"]
    assert "(3 already done" in result.output and not (store_copy / LOCK_NAME).exists()


def test_another_hosts_lock_needs_break_lock(store_copy, shapes_data, tiny_teachers, tiny_pass):
    write_lock(store_copy, host="elsewhere.invalid", pid=4242)
    before = (store_copy / MANIFEST_NAME).read_bytes()
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, store_copy, "--resume")
    assert_one_line_error(invoke(*args), f"{store_copy} is locked by a teacher pass on another host "
                          "(pid 4242 on elsewhere.invalid, since 2026-11-30T10:00:00Z)", "--break-lock")
    assert (store_copy / MANIFEST_NAME).read_bytes() == before and (store_copy / LOCK_NAME).is_file()
    result = invoke(*args, "--break-lock")
    assert result.exit_code == 0, result.output
    assert "broke the lock of a teacher pass on another host (pid 4242 on elsewhere.invalid" in result.output
    assert not (store_copy / LOCK_NAME).exists()


def test_an_incomplete_store_says_so_and_its_command_finishes_it(store_copy, shapes_data, tiny_teachers,
                                                                   tmp_path):
    manifest = Manifest.load(store_copy)  # a pass stopped after two of its three shards
    manifest.shards["000002"][STATUS] = STATUS_PENDING
    manifest.save(store_copy)
    for path in (signals_path(store_copy, "000002"), rejects_path(store_copy, "000002")):
        path.unlink()
    train = shapes_data / "train"
    needle = f"{store_copy}: incomplete: 2 of 3 shards done; finish it with mcad pipeline teacher-pass --data "
    line = assert_one_line_error(invoke(*student_args(store_copy, train, tmp_path / "run")), needle)
    assert "--data but not in the store" not in line and not (tmp_path / "run").exists()
    assert_one_line_error(invoke("signals", "validate", store_copy), needle)
    assert_one_line_error(invoke("pipeline", "sweep", "--store", store_copy, "--data", train, "--val-data",
                                 shapes_data / "val", "--out", tmp_path / "sweep", "--grid", "alpha=0"), needle)
    # The command in the line finishes the store.
    command = shlex.split(line.split("finish it with ", 1)[1])
    assert command[:3] == ["mcad", "pipeline", "teacher-pass"] and command[-1] == "--resume"
    result = invoke(*command[1:])
    assert result.exit_code == 0, result.output
    assert "from 1 shards (2 already done" in result.output
    assert invoke("signals", "validate", store_copy, "--data", train).exit_code == 0


def test_the_pass_records_each_input_tars_sha256(tiny_store, shapes_data):
    manifest = Manifest.load(tiny_store)
    for name, entry in manifest.shards.items():
        assert entry[SOURCE_SHA256] == file_digest(shapes_data / "train" / f"{name}.tar")


def _change_a_caption_byte(tar_path) -> None:
    """Change one letter of the first caption inside the tar: same size, same mtime, still a valid sample."""
    with tarfile.open(tar_path) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".txt"))
        offset = member.offset_data
    stat = os.stat(tar_path)
    with open(tar_path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x20]))  # 'a' <-> 'A'
    os.utime(tar_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_data_passes_a_good_store_and_refuses_a_rewritten_tar(store_copy, shapes_data, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(shapes_data / "train", data)  # copy2: sizes and mtimes kept
    manifest = Manifest.load(store_copy)  # the store made from this copy of the data
    for name, entry in manifest.shards.items():
        entry[SOURCE] = str(data / f"{name}.tar")
    manifest.save(store_copy)
    result = invoke(*student_args(store_copy, data, tmp_path / "good", "--verify-data"))
    assert result.exit_code == 0, result.output

    _change_a_caption_byte(data / "000001.tar")
    # Size and mtime are what a run checks by default: the change goes through unseen ...
    result = invoke(*student_args(store_copy, data, tmp_path / "unverified"))
    assert result.exit_code == 0, result.output
    # ... and --verify-data refuses it, naming the shard.
    assert_one_line_error(invoke(*student_args(store_copy, data, tmp_path / "verified", "--verify-data")),
                          "--verify-data: shard 000001 (", "the tar changed since the pass")


def test_verify_data_refuses_a_store_without_input_digests(store_copy, shapes_data, tmp_path):
    manifest = Manifest.load(store_copy)  # as a pass from before 2026-12-01 wrote it
    for entry in manifest.shards.values():
        del entry[SOURCE_SHA256]
    manifest.save(store_copy)
    assert_one_line_error(invoke(*student_args(store_copy, shapes_data / "train", tmp_path / "run",
                                               "--verify-data")),
                          "--verify-data: the store records no sha256 for shard 000000 (3 such")
    assert not (tmp_path / "run").exists()
