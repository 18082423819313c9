"""Fault matrix, crashes (issue #8): a lost process costs neither the run nor a sample.

End to end through a real `mcad` process, store and student (real Ray, pyarrow,
DuckDB and HF models; nothing mocked):

- the teacher pass: the driver SIGKILLed mid-run (the store then says it is
  incomplete to a student and to validate, and its lock is taken over) then
  --resume; two passes started at the same moment (one refused, naming the
  other); a Ray worker SIGKILLed mid-shard (slow); a full disk (slow, needs
  `unshare -m`); a read-only output folder; replaced teacher files refused on --resume.
  A resumed pass leaves the shards it found done as they were (same files, same entries).

The student killed mid-epoch, and the stores it refuses, are tests/jobs/test_student_resume.py.

The crash cases drive a real `mcad` process: a small driver script starts Ray
with a `worker_process_setup_hook` (Ray's own per-worker start-up hook) that
holds or kills a worker at one chosen moment, then calls `jobs.cli.main`.
Each such process gets its own RAY_TMPDIR; whatever it leaves running is
found by that folder in /proc/<pid>/environ and killed by pid.

    ./dev.sh test tests/jobs/test_fault_crashes.py                       the default cases
    ./dev.sh test tests/jobs/test_fault_crashes.py -m "slow or not slow"  + a worker killed, a full disk (about 80 s)
    ./dev.sh test tests/jobs/test_fault_crashes.py -k driver             one case
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import assert_one_line_error, invoke, leftovers
from mcad.storage.manifest import LOCK_NAME, MANIFEST_NAME, Manifest, REJECTS_DIR, ROWS, SIGNALS_DIR, rejects_path, signals_path

ROOT = Path(__file__).resolve().parents[2]
CAPTION = "a small red circle left of a large blue square"


# ------------------------------------------------------------------ helpers


def tables(store: Path, sub: str = SIGNALS_DIR) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((store / sub).glob("*.parquet"))}


def done_as_found(store: Path, names) -> dict:
    """What a resumed pass must leave alone of each shard it finds done: its manifest entry (the
    shard's own seconds included) and its files as they lie (inode, size, mtime in ns). A shard
    redone, even into identical bytes, changes them."""
    manifest = Manifest.load(store)
    return {name: (manifest.shards[name], [(s.st_ino, s.st_size, s.st_mtime_ns) for s in (
        os.stat(signals_path(store, name)), os.stat(rejects_path(store, name)))]) for name in names}


def assert_same_data(store: Path, reference: Path) -> None:
    for sub in (SIGNALS_DIR, REJECTS_DIR):
        got, want = tables(store, sub), tables(reference, sub)
        assert got.keys() == want.keys(), sub
        for name in want:
            assert got[name].equals(want[name]), f"{sub}/{name}"


# ------------------------------------------------------------ teacher pass

DRIVER = r'''
"""A real `mcad` process whose Ray workers misbehave once (fault-matrix tests only)."""
import logging, os, signal, sys, time

MODE, MARK = sys.argv[1], sys.argv[2]


def hook():
    """Ray runs this in each worker process at start: wrap the store's atomic writes."""
    import mcad.storage.atomic
    import mcad.storage.writer

    real = mcad.storage.atomic.atomic_write

    def atomic_write(path, write):
        def write_then_fault(tmp):
            write(tmp)  # the temporary file is complete, the rename still to come
            if os.sep + "signals" + os.sep not in str(path):
                return
            try:  # the run's first signals file goes through and leaves the mark
                fd = os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if MODE == "stall":  # later shards stay in flight until the driver is killed
                    time.sleep(600)
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if MODE == "die":  # this worker process dies mid-shard, once
                os.kill(os.getpid(), signal.SIGKILL)

        return real(path, write_then_fault)

    mcad.storage.atomic.atomic_write = atomic_write
    if hasattr(mcad.storage.writer, "atomic_write"):  # imported by name there, or called via mcad.storage.atomic
        mcad.storage.writer.atomic_write = atomic_write


import ray

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
         runtime_env={"worker_process_setup_hook": hook})
from mcad.jobs.cli import main

main(sys.argv[3:], prog_name="mcad")
'''


class MisbehavingDriver:
    """`mcad ARGS` in its own session and Ray temp folder, with a fault `mode` in its workers."""

    def __init__(self, tmp: Path, mode: str, args: list, prefix: tuple = (), script: str = DRIVER,
                 name: str = "driver"):
        self.mark = tmp / f"{mode}.mark"
        path = tmp / f"{name}.py"
        path.write_text(script)
        # A short path: Ray's socket names must stay under the OS limit.
        self.ray_tmp = tempfile.mkdtemp(prefix="mcad-fm-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=self.ray_tmp, RAY_BACKEND_LOG_LEVEL="fatal",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        self.log = open(tmp / f"{name}.log", "w+")
        self.proc = subprocess.Popen([*prefix, sys.executable, str(path), mode, str(self.mark), *map(str, args)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)

    def stray_pids(self) -> list[int]:
        """Processes still carrying this driver's RAY_TMPDIR (its Ray cluster)."""
        needle = f"RAY_TMPDIR={self.ray_tmp}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def clean_up(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        deadline = time.time() + 10  # Ray's own processes share the driver's fate; give them a moment
        while self.stray_pids() and time.time() < deadline:
            time.sleep(0.2)
        for pid in self.stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def misbehaving(tmp_path):
    started: list[MisbehavingDriver] = []

    def start(mode: str, *args, prefix: tuple = (), **kwargs) -> MisbehavingDriver:
        started.append(MisbehavingDriver(tmp_path, mode, list(args), prefix, **kwargs))
        return started[-1]

    yield start
    for driver in started:
        driver.clean_up()
        assert not driver.stray_pids(), "Ray processes of a test driver are still running"


def pass_args(shapes_data, tiny_teachers, tiny_pass, out) -> list:
    dual, single = tiny_teachers
    return ["pipeline", "teacher-pass", "--data", shapes_data / "train", "--dual", dual, "--single", single,
            "--out", out, "--pool", tiny_pass["pool_size"], "--topk", tiny_pass["topk"],
            "--pair-batch", tiny_pass["pair_batch"], "--calibration-rows", tiny_pass["calibration_rows"]]


@pytest.mark.ray
def test_driver_killed_mid_run_then_resume_matches_an_uninterrupted_run(
        misbehaving, tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    out = tmp_path / "store"
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, out)
    driver = misbehaving("stall", *args)
    deadline = time.time() + 180
    while time.time() < deadline and driver.proc.poll() is None:
        # One shard recorded, the next one stalled in its write: its temporary file is there.
        if (out / MANIFEST_NAME).exists() and Manifest.load(out).done_shards() and leftovers(out):
            break  # (a manifest is never seen torn: it is renamed into place)
        time.sleep(0.05)
    assert driver.proc.poll() is None, driver.output()[-3000:]
    os.kill(driver.proc.pid, signal.SIGKILL)  # the driver only; its Ray goes down with it
    assert driver.wait() == -signal.SIGKILL
    driver.clean_up()
    manifest = Manifest.load(out)
    done = manifest.done_shards()
    assert len(done) == 1 and leftovers(out), done  # killed mid-run, with a shard in flight
    assert sorted(manifest.shards) == ["000000", "000001", "000002"]  # all planned at the start
    assert (out / LOCK_NAME).is_file()  # a SIGKILLed driver leaves its lock
    found = done_as_found(out, done)

    # A student and validate say how far the pass got and how to finish it, naming the dead holder.
    incomplete = ("incomplete: 1 of 3 shards done (the pass that held its lock is gone: "
                  f"pid {driver.proc.pid} on ", "; finish it with mcad pipeline teacher-pass --data ")
    student = ("pipeline", "train-student", "--store", out, "--data", shapes_data / "train", "--out", tmp_path / "run")
    assert_one_line_error(invoke(*student, "--preset", "smoke"), *incomplete)
    assert_one_line_error(invoke("signals", "validate", out), *incomplete)

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"from {3 - len(done)} shards ({len(done)} already done" in result.output
    assert done_as_found(out, done) == found  # the resumed pass ran only the other shards
    assert f"took over the lock of a teacher pass that is gone (pid {driver.proc.pid} on " in result.output
    assert not (out / LOCK_NAME).exists()
    assert_same_data(out, tiny_store)
    assert leftovers(out) == []
    assert Manifest.load(out).done_shards() == ["000000", "000001", "000002"]


RACER = r'''
"""A real `mcad` process that waits for a start file (shared by two racers), then runs its command."""
import os, sys, time

MODE, START = sys.argv[1], sys.argv[2]
from mcad.jobs.cli import main
import mcad.jobs.teacher_pass  # what the pass imports, before the start

open(f"{START}.{os.getpid()}.ready", "w").close()
while not os.path.exists(START):
    time.sleep(0.001)  # both racers leave within a few milliseconds of each other
main(sys.argv[3:], prog_name="mcad")
'''


@pytest.mark.ray
def test_two_passes_started_at_the_same_moment_one_is_refused_naming_the_holder(
        misbehaving, tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    out = tmp_path / "store"
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, out)
    # Two settings that change no signal (the stall timeout), to tell the passes apart in the store.
    racers = [misbehaving("race", *args, "--stall-timeout", timeout, script=RACER, name=f"racer{timeout}")
              for timeout in (600, 601)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("race.mark.*.ready"))) < 2 and time.time() < deadline:
        assert all(r.proc.poll() is None for r in racers), [r.output() for r in racers]
        time.sleep(0.05)
    racers[0].mark.touch()  # the start line
    codes = [r.wait() for r in racers]
    assert sorted(codes) == [0, 2], [r.output()[-3000:] for r in racers]
    winner, loser = (racers[0], racers[1]) if codes[0] == 0 else (racers[1], racers[0])
    lines = [line for line in loser.output().splitlines() if line.strip()]
    assert len(lines) == 1, loser.output()
    assert lines[0].startswith(f"mcad: error: {out} is being written by another teacher pass "
                               f"(pid {winner.proc.pid} on "), lines[0]
    assert ", since " in lines[0] and "wait for it to finish" in lines[0]
    # The store is the winner's alone, whole and valid; the lock is gone.
    assert invoke("signals", "validate", out, "--data", shapes_data / "train").exit_code == 0
    assert_same_data(out, tiny_store)
    saved = json.loads((out / "teacher_pass_config.json").read_text())
    assert saved["stall_timeout_s"] == (600 if winner is racers[0] else 601)
    assert not (out / LOCK_NAME).exists() and leftovers(out) == []


@pytest.mark.slow  # a whole pass in a Ray cluster of its own, one actor started twice (about 30 s)
@pytest.mark.ray
def test_worker_killed_mid_shard_is_retried_and_the_job_completes(
        misbehaving, tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    out = tmp_path / "store"
    driver = misbehaving("die", *pass_args(shapes_data, tiny_teachers, tiny_pass, out))
    rc = driver.wait()
    assert rc == 0, driver.output()[-3000:]
    assert int(driver.mark.read_text()) > 0  # the pid of the worker that died mid-shard
    assert "60 rows from 3 shards" in driver.output()
    assert_same_data(out, tiny_store)
    assert leftovers(out) == []


DISK_KB = 48  # a tmpfs this small holds the config, W, the manifest and about one shard


@pytest.mark.slow  # a pass in a Ray cluster of its own (about 30 s)
@pytest.mark.ray
def test_full_disk_fails_in_one_line_and_a_later_run_resumes(
        misbehaving, tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    import shlex

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace (unshare -m) here: no small disk to fill")
    disk, copy = tmp_path / "disk", tmp_path / "store"
    disk.mkdir()
    # In a mount namespace of its own: a tiny tmpfs as the output disk, the pass,
    # then the store as the full disk left it copied out for inspection.
    inside = (f"mount -t tmpfs -o size={DISK_KB}k tmpfs {shlex.quote(str(disk))} || exit 97; "
              f"\"$@\"; rc=$?; cp -a {shlex.quote(str(disk / 'store'))} {shlex.quote(str(copy))}; exit $rc")
    driver = misbehaving("plain", *pass_args(shapes_data, tiny_teachers, tiny_pass, disk / "store"),
                         prefix=("unshare", "-m", "sh", "-c", inside, "sh"))
    rc, output = driver.wait(), driver.output()
    assert rc == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "mcad: error:" in line]
    assert len(errors) == 1 and "No space left on device: " in errors[0] and "--resume" in errors[0], output
    assert "Traceback" not in output
    assert leftovers(copy) == []
    # The manifest is whole and every shard it records is complete; a shard the
    # disk filled up after may have complete files but no entry: --resume redoes it.
    manifest = Manifest.load(copy)
    for name in manifest.done_shards():
        assert pq.read_metadata(signals_path(copy, name)).num_rows == manifest.shards[name][ROWS]
    for path in (copy / SIGNALS_DIR).glob("*.parquet"):
        pq.read_metadata(path)  # whole Parquet files only
    done = manifest.done_shards()

    result = invoke(*pass_args(shapes_data, tiny_teachers, tiny_pass, copy), "--resume")
    assert result.exit_code == 0, result.output
    assert f"({len(done)} already done" in result.output
    assert_same_data(copy, tiny_store)
    assert leftovers(copy) == []


def _make_read_only(folder: Path):
    """Make `folder` refuse new files, also for root (chattr +i); return the undo, or skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode:
            pytest.skip("running as root and chattr +i is unavailable: no way to make a folder read-only")
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    try:
        (folder / "probe").touch()
    except OSError:
        return undo
    (folder / "probe").unlink()
    undo()
    pytest.skip(f"{folder} stays writable here")


@pytest.mark.ray
def test_read_only_output_fails_in_one_line_and_a_later_run_resumes(
        tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    manifest = Manifest.load(out)  # a pass that stopped after two shards
    del manifest.shards["000002"]
    manifest.save(out)
    for path in (signals_path(out, "000002"), rejects_path(out, "000002")):
        path.unlink()
    before = Manifest.load(out)
    found = done_as_found(out, before.done_shards())
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, out) + ["--resume"]

    undo = _make_read_only(out / SIGNALS_DIR)
    try:
        result = invoke(*args)
    finally:
        undo()
    line = assert_one_line_error(result, "shard 000002", "signals/000002.parquet", "--resume")
    assert "not permitted" in line or "denied" in line or "Read-only" in line
    # The manifest still says two shards done; the third is planned (pending) since the run began.
    after = Manifest.load(out)
    assert after.done_shards() == ["000000", "000001"] and after.shards["000002"]["status"] == "pending"
    assert {n: after.shards[n] for n in after.done_shards()} == {n: before.shards[n] for n in before.done_shards()}
    assert not signals_path(out, "000002").exists() and not rejects_path(out, "000002").exists()
    assert leftovers(out) == []

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "from 1 shards (2 already done" in result.output
    assert done_as_found(out, ["000000", "000001"]) == found  # only the third shard was run
    assert_same_data(out, tiny_store)


@pytest.mark.ray
def test_read_only_store_folder_fails_before_any_work(tiny_store, shapes_data, tiny_teachers, tiny_pass,
                                                      tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    undo = _make_read_only(out)
    try:
        result = invoke(*pass_args(shapes_data, tiny_teachers, tiny_pass, out), "--resume")
    finally:
        undo()
    assert_one_line_error(result, str(out / LOCK_NAME))  # the lock, the pass's first write
    assert leftovers(out) == []


@pytest.mark.ray
def test_resume_refuses_replaced_teacher_files(tiny_store, shapes_data, tiny_teachers, tiny_pass, tmp_path):
    """Same paths, other weights: resuming would mix two teachers' signals in one store."""
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    teachers = tmp_path / "teachers"
    for role, path in zip(("dual", "single"), tiny_teachers):
        shutil.copytree(path, teachers / role)
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    config = json.loads((out / "teacher_pass_config.json").read_text())
    config.update(dual=str(teachers / "dual"), single=str(teachers / "single"))
    (out / "teacher_pass_config.json").write_text(json.dumps(config))
    args = pass_args(shapes_data, (teachers / "dual", teachers / "single"), tiny_pass, out) + ["--resume"]
    other = make_tiny_teachers(tmp_path / "other", [CAPTION], seed=7)
    shutil.copy(other[0] / "model.safetensors", teachers / "dual" / "model.safetensors")
    assert_one_line_error(invoke(*args), "cannot resume", "dual teacher's weights_sha256")
