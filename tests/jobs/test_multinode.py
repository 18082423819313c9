"""A real two-node Ray cluster on loopback: the teacher pass and a sweep join it with --ray-address.

A head node and a worker node are started as separate `ray start` processes
with a temporary folder of their own; the mcad commands run as subprocesses
(as a user would run them against a cluster), shipping mcad's code with a
runtime environment. The worker node is killed in the middle of a teacher
pass: its shard is retried elsewhere and the store still ends complete.
Each node has one CPU: the sweep after the pass places one trial per node,
and requests no node can hold are refused at once in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
MCAD = str(Path(sys.executable).with_name("mcad"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def _kill_trees(match: str) -> list[str]:
    """SIGKILL every process whose command line contains `match`, and all their descendants."""
    procs = _processes()
    doomed = {pid for pid, (_, cmd) in procs.items() if match in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        doomed |= children
        grew = bool(children)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [procs[pid][1] for pid in doomed]


class TwoNodes:
    def __init__(self, root: Path):
        self.root = root
        self.port, self.worker_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Our own temp folder and no auth token: nothing shared with other Ray clusters here.
        self.env = {**os.environ, "RAY_TMPDIR": str(root), "RAY_AUTH_MODE": "disabled",
                    "RAY_BACKEND_LOG_LEVEL": "fatal", "OMP_NUM_THREADS": "1"}

    def start(self) -> None:
        common = ["--disable-usage-stats", "--include-dashboard=false"]
        # One logical CPU per node, as small as a node gets: every job must ask only what one node
        # has (a sweep trial asking the cluster's 2 CPUs waited forever here before).
        self._ray("start", "--head", f"--port={self.port}", "--num-cpus=1", f"--temp-dir={self.root}",
                  "--node-manager-port", str(_free_port()), *common)
        self.start_worker()

    def start_worker(self) -> None:
        self._ray("start", f"--address={self.address}", "--num-cpus=1",
                  "--node-manager-port", str(self.worker_port), "--disable-usage-stats")

    def kill_worker_node(self) -> list[str]:
        return _kill_trees(f"node_manager_port={self.worker_port}")

    def stop(self) -> None:
        _kill_trees(str(self.root))
        shutil.rmtree(self.root, ignore_errors=True)

    def shipped_packages(self) -> set[str]:
        """Packages the cluster unpacked from jobs' runtime environments (py_modules), with their
        sub-packages: {"mcad", "mcad/storage", ...}."""
        unpacked = self.root.glob("session_*/runtime_resources/py_modules_files/_ray_pkg_*")
        return {str(p.relative_to(pkg)).replace("/__init__.py", "") for pkg in unpacked
                for p in pkg.glob("**/__init__.py") if "__pycache__" not in p.parts}

    def _ray(self, *args: str) -> None:
        subprocess.run([RAY, *args], env=self.env, check=True, capture_output=True, timeout=120)

    def mcad(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([MCAD, *args, "--ray-address", self.address], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def two_nodes():
    root = Path(tempfile.mkdtemp(prefix="mcad-ray-", dir="/tmp"))  # short: Ray's socket paths
    cluster = TwoNodes(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """12 shards of 16 samples: enough shards that a node can die while some are left."""
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark

    out = tmp_path_factory.mktemp("wide")
    write_benchmark(SynthConfig(train=192, val=10, test=10, shard_size=16, seed=1), out)
    return out


def _done_shards(store: Path) -> int:
    try:
        manifest = json.loads((store / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(1 for e in manifest.get("shards", {}).values() if e.get("status") == "done")


def test_teacher_pass_survives_losing_a_worker_node_then_a_sweep_runs(two_nodes, wide_data, tiny_teachers,
                                                                     tiny_pass, tmp_path):
    from mcad.storage.reader import open_store

    dual, single = tiny_teachers
    store = tmp_path / "store"
    args = ["pipeline", "teacher-pass", "--data", str(wide_data / "train"), "--dual", dual, "--single", single,
            "--out", str(store), "--workers", "2", "--stall-timeout", "240",
            "--pool", str(tiny_pass["pool_size"]), "--topk", str(tiny_pass["topk"]),
            "--calibration-rows", str(tiny_pass["calibration_rows"])]
    job = two_nodes.mcad(*args)
    deadline = time.time() + 240
    while _done_shards(store) < 1 and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, f"the pass ended before the node could be killed:\n{job.stdout.read()}"
    done_before = _done_shards(store)
    killed = two_nodes.kill_worker_node()
    assert any("ShardWorker" in cmd for cmd in killed), killed  # a teacher actor died with the node
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert done_before < 12
    # mcad's code was shipped to the cluster in the job's runtime environment (py_modules).
    assert {"mcad", "mcad/storage", "mcad/student", "mcad/pipeline", "mcad/jobs"} <= two_nodes.shipped_packages()
    opened = open_store(store)  # refuses anything incomplete, orphaned or miscounted
    assert opened.num_rows == 192 and len(opened.shards) == 12
    check = subprocess.run([MCAD, "signals", "validate", str(store), "--data", str(wide_data / "train")],
                           env=two_nodes.env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    two_nodes.start_worker()  # the node comes back (as an autoscaler would replace it)
    sweep = tmp_path / "sweep"
    job = two_nodes.mcad("pipeline", "sweep", "--store", str(store), "--data", str(wide_data / "train"),
                         "--val-data", str(wide_data / "val"), "--out", str(sweep), "--grid", "alpha=0,1",
                         "--grid", "preset=smoke", "--epochs", "1", "--parallel", "2")
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",finished," in r for r in rows[1:])
    # Each trial's progress reached the driver (tailed from its metrics.jsonl on the shared run folder).
    for trial in ("alpha=0.0,preset=smoke", "alpha=1.0,preset=smoke"):
        assert any(line.startswith(trial) and "samples/s" in line and "val rsum " in line
                   for line in output.replace("\r", "\n").splitlines()), output
    assert (sweep / "best" / "config.json").is_file()

    # What no node can hold is refused at once, in one line: nothing waits for it.
    started = time.time()
    too_big = two_nodes.mcad("pipeline", "sweep", "--store", str(store), "--data", str(wide_data / "train"),
                             "--val-data", str(wide_data / "val"), "--out", str(tmp_path / "sweep2"),
                             "--grid", "alpha=0,1", "--parallel", "1", "--cpus-per-trial", "2")
    no_gpu = two_nodes.mcad("pipeline", "train-student", "--store", str(store), "--data", str(wide_data / "train"),
                            "--out", str(tmp_path / "run"), "--workers", "2", "--gpus-per-worker", "1")
    for job, line in ((too_big, "each sweep trial asks 2 CPUs; the largest node has 1 (2 nodes)"),
                      (no_gpu, "each train-student worker asks 1 GPU; the largest node has 0 (2 nodes)")):
        output, _ = job.communicate(timeout=120)
        assert job.returncode == 2 and output.strip().splitlines()[-1] == f"mcad: error: {line}", output
        assert "Traceback" not in output
    assert time.time() - started < 60
