"""The fault matrix (issue #8): one bad file or a lost process must cost neither the run nor a sample.

Every case is a test here, end to end through the real pass, store, student or
CLI (real Ray, pyarrow, DuckDB and HF models; nothing mocked). Per-reason unit
tests of the shard reader live in tests/pipeline/test_shards.py; this module
checks that each case survives the whole teacher pass.

    ./dev.sh test tests/jobs/test_fault_matrix.py            the matrix (about 90 s on 2 cores)
    ./dev.sh test tests/jobs/test_fault_matrix.py -m slow    + a worker killed, a full disk (about 80 s)
    ./dev.sh test tests/jobs/test_fault_matrix.py -k driver  one case

1. Inputs       damaged shards through a real teacher pass: good samples kept, each
                reject with its reason in rejects/ and in `mcad signals stats`,
                kept + rejected = the input, per shard.
2. Crashes      the driver SIGKILLed mid-run then --resume; a Ray worker SIGKILLed
                mid-shard; a read-only output folder.
3. Student      SIGKILLed mid-epoch then --resume; stores that do not match refused.
4. CLI          bad arguments: exit code 2, one line, no traceback.
5. Security     no pickle on any load path, no remote code, Pillow's bomb limit,
                tar member names never used as paths.

The crash cases drive a real `mcad` process: a small driver script starts Ray
with a `worker_process_setup_hook` (Ray's own per-worker start-up hook) that
holds or kills a worker at one chosen moment, then calls `jobs.cli.main`.
Each such process gets its own RAY_TMPDIR; whatever it leaves running is
found by that folder in /proc/<pid>/environ and killed by pid.
"""
from __future__ import annotations

import ast
import collections
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from mcad.jobs.cli import main
from mcad.pipeline.shards import CORRUPT_IMAGE, DUPLICATE_KEY, EMPTY_CAPTION, IMAGE_TOO_LARGE, MALFORMED_JSON, NOT_A_TAR, NO_CAPTION, TRUNCATED_TAR, UNDECODABLE_TEXT, UNSAFE_MEMBER
from mcad.storage.manifest import MANIFEST_NAME, Manifest, REJECTED, REJECTS_DIR, ROWS, SIGNALS_DIR, rejects_path, signals_path
from mcad.storage.atomic import TMP_PREFIX

ROOT = Path(__file__).resolve().parents[2]
KEPT = "kept"
PROGRESS = re.compile(r"\d+/\d+ \[\d\d:\d\d")
CAPTION = "a small red circle left of a large blue square"


# ------------------------------------------------------------------ helpers


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, exactly one line `mcad: error: ...`, no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    # Progress bars (tqdm, on stderr, redrawn with \r) are not part of the message.
    lines = [line for line in result.output.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("mcad: error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tables(store: Path, sub: str = SIGNALS_DIR) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((store / sub).glob("*.parquet"))}


def assert_same_data(store: Path, reference: Path) -> None:
    for sub in (SIGNALS_DIR, REJECTS_DIR):
        got, want = tables(store, sub), tables(reference, sub)
        assert got.keys() == want.keys(), sub
        for name in want:
            assert got[name].equals(want[name]), f"{sub}/{name}"


def leftovers(store: Path) -> list[str]:
    """Temporary files anywhere in a store: a clean store has none."""
    return sorted(str(p.relative_to(store)) for p in store.rglob(TMP_PREFIX + "*"))


def image(mode: str = "RGB", fmt: str = "JPEG", color=(200, 30, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels but holds almost no data (a bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, img: bytes | None = None, *, ext: str = "jpg", txt: bytes | None = CAPTION.encode(),
           js: bytes | None = None) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image() if img is None else img)]
    if txt is not None:
        members.append((f"{key}.txt", txt))
    if js is not None:
        members.append((f"{key}.json", js))
    return members


# ------------------------------------------------------------ 1. inputs

# (case, shard, key, what the store must say about that sample)
INPUT_CASES = [
    ("corrupt JPEG", "000000", "img-corrupt-jpeg", CORRUPT_IMAGE),
    ("zero-byte image", "000000", "img-zero-byte", CORRUPT_IMAGE),
    ("PNG with alpha", "000000", "img-png-alpha", KEPT),
    ("CMYK JPEG", "000000", "img-cmyk-jpeg", KEPT),
    ("16-bit PNG", "000000", "img-png-16bit", KEPT),
    ("image over the pixel limit", "000000", "img-bomb", IMAGE_TOO_LARGE),
    ("missing caption", "000001", "cap-missing", NO_CAPTION),
    ("empty caption", "000001", "cap-empty", EMPTY_CAPTION),
    ("whitespace caption", "000001", "cap-whitespace", EMPTY_CAPTION),
    ("non-UTF-8 caption", "000001", "cap-non-utf8", UNDECODABLE_TEXT),
    ("malformed json", "000001", "cap-bad-json", MALFORMED_JSON),
    ("duplicate key (second occurrence)", "000001", "cap-dup", DUPLICATE_KEY),
    ("truncated tar", "000002", "trunc-cut", TRUNCATED_TAR),
    ("file that is not a tar", "000003", "000003", NOT_A_TAR),
    ("tar member named ../", "000005", "../evil", UNSAFE_MEMBER),
    ("tar member with an absolute name", "000005", "/abs/evil", UNSAFE_MEMBER),
]
# Samples each shard holds (wholly or in part): kept + rejected must equal these.
INPUT_COUNTS = {"000000": 9, "000001": 9, "000002": 3, "000003": 1, "000004": 0, "000005": 4}
GOOD_KEYS = {"000000": ["img-good-0", "img-good-1", "img-good-2"], "000001": ["cap-good-0", "cap-dup", "cap-good-1"],
             "000002": ["trunc-good-0", "trunc-good-1"], "000005": ["safe-good-0", "safe-good-1"]}


def write_damaged_shards(folder: Path) -> Path:
    """Six shards holding every input case of the matrix next to good samples."""
    folder.mkdir(parents=True)
    cmyk = image("CMYK", color=(0, 200, 200, 0))
    write_tar(folder / "000000.tar", [
        *sample("img-good-0"),
        *sample("img-corrupt-jpeg", image()[:120]),
        *sample("img-zero-byte", b""),
        *sample("img-good-1", image(color=(30, 200, 30))),
        *sample("img-png-alpha", image("RGBA", "PNG", (0, 0, 255, 0)), ext="png"),
        *sample("img-cmyk-jpeg", cmyk),
        *sample("img-png-16bit", image("I;16", "PNG", 40000), ext="png"),
        *sample("img-bomb", png_header(20000, 20000), ext="png"),
        *sample("img-good-2", image(color=(30, 30, 200))),
    ])
    write_tar(folder / "000001.tar", [
        *sample("cap-good-0"),
        *sample("cap-missing", txt=None, js=b'{"url": "http://example.com/x.jpg"}'),
        *sample("cap-empty", txt=b""),
        *sample("cap-whitespace", txt=b"  \n\t "),
        *sample("cap-non-utf8", txt=b"a caf\xe9 \xff\xfe"),
        *sample("cap-dup"),
        *sample("cap-bad-json", js=b'{"caption": "x"'),
        *sample("cap-dup", image(color=(0, 0, 0))),
        *sample("cap-good-1"),
    ])
    full = write_tar(folder / "000002.tar", [*sample("trunc-good-0"), *sample("trunc-good-1"), *sample("trunc-cut")])
    with tarfile.open(full) as tf:
        cut = tf.getmember("trunc-cut.jpg").offset_data + 50
    full.write_bytes(full.read_bytes()[:cut])  # cut inside the third sample's image
    (folder / "000003.tar").write_bytes(b"key\tcaption\nthis file is not a tar\n" * 40)
    write_tar(folder / "000004.tar", [])
    write_tar(folder / "000005.tar", [
        *sample("safe-good-0"),
        ("../evil.jpg", image()), ("../evil.txt", CAPTION.encode()),
        ("/abs/evil.jpg", image()), ("/abs/evil.txt", CAPTION.encode()),
        *sample("safe-good-1"),
    ])
    return folder


@pytest.fixture(scope="module")
def damaged(ray_local, tiny_teachers, tiny_pass, tmp_path_factory):
    """The damaged shards and the store a real teacher pass made of them."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    root = tmp_path_factory.mktemp("damaged")
    data = write_damaged_shards(root / "data")
    dual, single = tiny_teachers
    run_teacher_pass(TeacherPassJob(data=str(data), dual=dual, single=single, out=str(root / "store"),
                                    **tiny_pass), progress=False)
    return data, root / "store"


def store_keys(store: Path, shard: str) -> tuple[list[str], list[tuple[str, str]]]:
    from mcad.storage import schema

    kept = pq.read_table(signals_path(store, shard)).column(schema.KEY).to_pylist()
    rej = pq.read_table(rejects_path(store, shard)).to_pylist()
    return kept, [(r[schema.REJECT_KEY], r[schema.REJECT_REASON]) for r in rej]


@pytest.mark.ray
@pytest.mark.parametrize("case, shard, key, outcome", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_input_case_is_kept_or_rejected_with_its_reason(damaged, case, shard, key, outcome):
    _, store = damaged
    kept, rejected = store_keys(store, shard)
    if outcome == KEPT:
        assert key in kept and key not in dict(rejected)
    else:
        assert (key, outcome) in rejected
    if shard in GOOD_KEYS:  # the damaged shard's good samples are all kept, in order
        assert [k for k in kept if k in GOOD_KEYS[shard]] == GOOD_KEYS[shard]


@pytest.mark.ray
def test_every_shard_accounts_for_every_sample(damaged):
    data, store = damaged
    manifest = Manifest.load(store)
    assert sorted(manifest.done_shards()) == sorted(INPUT_COUNTS)  # the empty shard too
    for shard, count in INPUT_COUNTS.items():
        kept, rejected = store_keys(store, shard)
        entry = manifest.shards[shard]
        assert (entry[ROWS], entry[REJECTED]) == (len(kept), len(rejected)), shard
        assert len(kept) + len(rejected) == count, shard
    # And key by key, in tar order, against the input (DuckDB over the store).
    result = invoke("signals", "validate", store, "--data", data)
    assert result.exit_code == 0, result.output
    assert leftovers(store) == []


@pytest.mark.ray
def test_stats_counts_every_reject_reason(damaged, tmp_path):
    _, store = damaged
    want = collections.Counter(outcome for _, _, _, outcome in INPUT_CASES if outcome != KEPT)
    want[UNSAFE_MEMBER] = 2
    result = invoke("signals", "stats", store, "--json", tmp_path / "stats.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "stats.json").read_text())["rejects_by_reason"] == dict(want)
    for reason, n in want.items():
        assert any(line.split() == [reason, str(n)] for line in result.output.splitlines()), reason


@pytest.mark.ray
def test_tar_member_names_are_never_used_as_paths(damaged):
    data, _ = damaged
    assert not (data.parent / "evil.jpg").exists() and not (data / "evil.jpg").exists()
    assert not Path("/abs").exists()


# ------------------------------------------------------------ 2. crashes

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

    def __init__(self, tmp: Path, mode: str, args: list, prefix: tuple = ()):
        self.mark = tmp / f"{mode}.mark"
        script = tmp / "driver.py"
        script.write_text(DRIVER)
        # A short path: Ray's socket names must stay under the OS limit.
        self.ray_tmp = tempfile.mkdtemp(prefix="mcad-fm-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=self.ray_tmp, RAY_BACKEND_LOG_LEVEL="fatal",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        self.log = open(tmp / "driver.log", "w+")
        self.proc = subprocess.Popen([*prefix, sys.executable, str(script), mode, str(self.mark), *map(str, args)],
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

    def start(mode: str, *args, prefix: tuple = ()) -> MisbehavingDriver:
        started.append(MisbehavingDriver(tmp_path, mode, list(args), prefix))
        return started[-1]

    yield start
    for driver in started:
        driver.clean_up()
        assert not driver.stray_pids(), "Ray processes of a test driver are still running"


def pass_args(shapes_data, tiny_teachers, tiny_pass, out) -> list:
    dual, single = tiny_teachers
    return ["pipeline", "teacher-pass", "--data", shapes_data / "train", "--dual", dual, "--single", single,
            "--out", out, "--pool", tiny_pass["pool_size"], "--topk", tiny_pass["topk"],
            "--batch-size", tiny_pass["batch_size"], "--calibration-rows", tiny_pass["calibration_rows"]]


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
    done = Manifest.load(out).done_shards()
    assert len(done) == 1 and leftovers(out), done  # killed mid-run, with a shard in flight

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"({len(done)} already done" in result.output
    assert_same_data(out, tiny_store)
    assert leftovers(out) == []
    assert Manifest.load(out).done_shards() == ["000000", "000001", "000002"]


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
    before = (out / MANIFEST_NAME).read_bytes()
    args = pass_args(shapes_data, tiny_teachers, tiny_pass, out) + ["--resume"]

    undo = _make_read_only(out / SIGNALS_DIR)
    try:
        result = invoke(*args)
    finally:
        undo()
    line = assert_one_line_error(result, "shard 000002", "signals/000002.parquet", "--resume")
    assert "not permitted" in line or "denied" in line or "Read-only" in line
    assert (out / MANIFEST_NAME).read_bytes() == before  # the manifest still says two shards
    assert not signals_path(out, "000002").exists() and not rejects_path(out, "000002").exists()
    assert leftovers(out) == []

    result = invoke(*args)
    assert result.exit_code == 0, result.output
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
    assert_one_line_error(result, str(out / "teacher_pass_config.json"))
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


# ------------------------------------------------------------ 3. student

STUDENT_EPOCHS = 4


def student_args(store, data, run, *extra) -> list:
    return ["pipeline", "train-student", "--store", store, "--data", data, "--out", run,
            "--preset", "smoke", "--epochs", STUDENT_EPOCHS, *extra]


@pytest.fixture(scope="module")
def student_run(tiny_store, shapes_data, tmp_path_factory):
    """An uninterrupted student run on the toy store."""
    run = tmp_path_factory.mktemp("student") / "run"
    result = invoke(*student_args(tiny_store, shapes_data / "train", run))
    assert result.exit_code == 0, result.output
    return run


def model_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    (weights,) = sorted((run / "model").glob("*.safetensors"))
    return load_file(weights)


@pytest.mark.ray
def test_student_killed_mid_epoch_resumes_from_its_last_checkpoint(student_run, tiny_store, shapes_data, tmp_path):
    import torch

    run = tmp_path / "run"
    args = student_args(tiny_store, shapes_data / "train", run)
    log = tmp_path / "student.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from mcad.jobs.cli import main; "
                                 "main(sys.argv[1:], prog_name='mcad')", *map(str, args)],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    state = run / "checkpoints" / "last" / "state.json"
    try:
        deadline = time.time() + 180
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)  # during a later epoch: only the first one is saved
    finally:
        proc.kill()
        rc = proc.wait()
    assert rc == -signal.SIGKILL
    saved = json.loads(state.read_text())["epoch"]
    assert saved < STUDENT_EPOCHS - 1, "the run finished before it could be killed"

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(STUDENT_EPOCHS))
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # nothing logged twice after the resume
    want, got = model_tensors(student_run), model_tensors(run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name].float(), got[name].float(), atol=1e-5), name


def _store_with(tiny_store, tmp_path, edit) -> Path:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    raw = json.loads((store / MANIFEST_NAME).read_text())
    edit(raw)
    (store / MANIFEST_NAME).write_text(json.dumps(raw))
    return store


def _other_teacher(raw):
    raw["teachers"]["single"]["weights_sha256"] = "0" * 64


def _future_schema(raw):
    raw["schema_version"] = 99


@pytest.mark.ray
@pytest.mark.parametrize("case", ["another shard set", "a changed shard file", "another teacher (online)",
                                  "another teacher (resume)", "unknown schema version"])
def test_student_refuses_a_store_that_does_not_match(case, student_run, tiny_store, shapes_data, tiny_teachers,
                                                    tmp_path):
    train = shapes_data / "train"
    run = tmp_path / "run"
    if case == "another shard set":
        args, needle = student_args(tiny_store, shapes_data / "val", run), "does not match the store"
    elif case == "a changed shard file":
        data = tmp_path / "train"
        shutil.copytree(train, data)
        os.utime(data / "000001.tar", (1, 1))
        args, needle = student_args(tiny_store, data, run), "shard 000001"
    elif case == "another teacher (online)":
        from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

        other = make_tiny_teachers(tmp_path / "other", [CAPTION], seed=1)
        args = student_args(tiny_store, train, run, "--online-teachers", *other)
        needle = "not the one the store was made with"
    elif case == "another teacher (resume)":
        shutil.copytree(student_run, run)
        store = _store_with(tiny_store, tmp_path, _other_teacher)
        args, needle = student_args(store, train, run, "--resume"), "teachers differ"
    else:
        store = _store_with(tiny_store, tmp_path, _future_schema)
        args, needle = student_args(store, train, run), "schema version 99"
    assert_one_line_error(invoke(*args), needle)


# ------------------------------------------------------------ 4. CLI


def _cli_case(case: str, shapes_data: Path, teachers: tuple, tmp: Path) -> tuple[list, str]:
    dual, single = teachers
    train = shapes_data / "train"

    def tp(data=train, d=dual, s=single, *extra):
        return ["pipeline", "teacher-pass", "--data", data, "--dual", d, "--single", s, "--out", tmp / "s",
                "--pool", "8", "--topk", "3", *extra]

    (tmp / "empty").mkdir()
    ts = ["pipeline", "train-student", "--store", tmp, "--data", train, "--out", tmp / "r"]
    return {
        "data does not exist": (tp(tmp / "nowhere"), "shard not found"),
        "teacher folder does not exist": (tp(train, tmp / "nowhere"), "does not exist"),
        "store does not exist": (["signals", "stats", tmp / "nowhere"], "not a signal store"),
        "K larger than the pool": (tp()[:-4] + ["--pool", "8", "--topk", "9"], "must not exceed the pool size"),
        "pool smaller than 2": (tp()[:-4] + ["--pool", "1", "--topk", "1"], "pool size must be at least 2"),
        "dual is not a CLIP": (tp(train, single, single), "expected 'clip'"),
        "single is not a BLIP-ITM": (tp(train, dual, dual), "expected 'blip'"),
        "teacher folder is not a model": (tp(train, tmp / "empty"), "not a Hugging Face model directory"),
        "eval model is not a CLIP": (["eval", "--model", single, "--data", train], "expected 'clip'"),
        "negative loss weight": (ts + ["--w-feat", "-0.5"], "--w-feat must be >= 0"),
        "negative alpha": (ts + ["--alpha", "-1"], "--alpha must be >= 0"),
        "empty dataset (no shards)": (tp(tmp / "empty"), "no shards match"),
        "not a number": (tp()[:-2] + ["--topk", "many"], "'many' is not a valid integer"),
    }[case]


CLI_CASES = ["data does not exist", "teacher folder does not exist", "store does not exist",
             "K larger than the pool", "pool smaller than 2", "dual is not a CLIP", "single is not a BLIP-ITM",
             "teacher folder is not a model", "eval model is not a CLIP", "negative loss weight",
             "negative alpha", "empty dataset (no shards)", "not a number"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_cli_input_is_one_line_and_exit_2(case, shapes_data, tiny_teachers, tmp_path):
    args, needle = _cli_case(case, shapes_data, tiny_teachers, tmp_path)
    assert_one_line_error(invoke(*args), needle)
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.ray
def test_dataset_without_a_usable_sample_is_one_line_and_exit_2(tiny_teachers, tiny_pass, tmp_path):
    """Found only once the pass reads the shards (in a Ray task): still one line."""
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", [])
    (data / "000001.tar").write_bytes(b"not a tar\n" * 10)
    dual, single = tiny_teachers
    result = invoke("pipeline", "teacher-pass", "--data", data, "--dual", dual, "--single", single,
                    "--out", tmp_path / "s", "--pool", 8, "--topk", 3)
    assert_one_line_error(result, "no kept samples")


# ------------------------------------------------------------ 5. security

PRODUCT_PACKAGES = ("mcad.storage", "mcad.student", "mcad.pipeline", "mcad.jobs")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _product_sources():
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _callee(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _functions(tree):
    """(enclosing function name, node) for every node."""
    def walk(node, fn):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            yield name, child
            yield from walk(child, name)
    yield from walk(tree, "")


def test_no_pickle_and_no_remote_code_on_any_load_path():
    problems = []
    for rel, tree in _product_sources():
        for fn, node in _functions(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                callee = _callee(node)
                if callee == "torch.load" and _kw(node, "weights_only") is not True:
                    problems.append(f"{where} torch.load without weights_only=True")
                if callee.endswith(("np.load", "numpy.load")) and _kw(node, "allow_pickle") not in (None, False):
                    problems.append(f"{where} np.load with allow_pickle")
                if callee.endswith(("read_pickle", ".extract", ".extractall")):
                    problems.append(f"{where} calls {callee}")
                if any(kw.arg == "trust_remote_code" for kw in node.keywords) and \
                        _kw(node, "trust_remote_code") is not False:
                    problems.append(f"{where} trust_remote_code is not False")
                model_load = callee.endswith(".from_pretrained") and not any(
                    s in callee for s in ("Processor", "Tokenizer", "Config"))
                if model_load and _kw(node, "use_safetensors") is not True:
                    problems.append(f"{where} {callee} without use_safetensors=True")
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "MAX_IMAGE_PIXELS" for t in targets):
                    problems.append(f"{where} changes Pillow's MAX_IMAGE_PIXELS")
    assert problems == []


def test_pillow_bomb_limit_is_in_force_after_every_import():
    code = ("import importlib, pkgutil\nfrom PIL import Image\ndefault = Image.MAX_IMAGE_PIXELS\n"
            f"for pkg in {PRODUCT_PACKAGES!r}:\n"
            "    mod = importlib.import_module(pkg)\n"
            "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "assert default and Image.MAX_IMAGE_PIXELS == default, Image.MAX_IMAGE_PIXELS\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    # The limit itself (and ours below it) rejecting real bombs: tests/pipeline/test_shards.py
    # test_image_over_pixel_limit / test_decompression_bomb_is_checked_from_the_header, and the
    # "image over the pixel limit" input case above, through the whole pass.


class _Payload:
    """Unpickling this creates the file it names: proof that a load ran pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_payloads_are_never_unpickled(tiny_teachers, tmp_path):
    import torch

    from mcad.pipeline.teachers import DualTeacher
    from mcad.storage.errors import InputError
    from mcad.student.checkpoint import load_checkpoint
    from mcad.student.models import build_student

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live
    assert probe.exists()
    mark = tmp_path / "unpickled"

    # A teacher folder holding a pickled checkpoint: with safetensors beside it the
    # safetensors load; alone, the folder is refused.
    teacher = tmp_path / "dual"
    shutil.copytree(tiny_teachers[0], teacher)
    torch.save(_Payload(mark), teacher / "pytorch_model.bin")
    DualTeacher.load(teacher)
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(InputError, match="no safetensors weights"):
        DualTeacher.load(teacher)

    # A student checkpoint whose optimiser state is a pickle payload.
    student, _ = build_student("smoke", tokenizer_from=tiny_teachers[0], teacher_dim=8, seed=0)
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, last / "student.safetensors")
    (last / "state.json").write_text('{"epoch": 0, "step": 1}')
    torch.save(_Payload(mark), last / "optimizer.pt")
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "checkpoints", model=student, optimizer=optimizer)
    assert not mark.exists()
