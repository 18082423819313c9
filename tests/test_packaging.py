"""The distribution installs under one name: the wheel's only top-level package is `mcad`.

The folders storage/, student/, pipeline/ and jobs/ stay at the top of the
repository and are mapped into `mcad.*` at install time (pyproject.toml,
docs/design.md section 2). This builds the wheel, installs it into a fresh
virtual environment (dependencies borrowed from the test environment as a plain
path, so the editable install of this checkout stays out of sight) and runs
mcad from there, away from the repository.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

import mcad

ROOT = Path(__file__).resolve().parents[1]
# A document named in the repository: a Markdown file, or a note named in capitals ending in "_NOTES";
# not an output a command writes, named as OUT/x.md (docs) or out / "x.md" (tests reading a run's output).
DOCUMENT = re.compile(r"(?<!OUT/)(?<!out / \")\b([A-Za-z0-9_-]+\.md|[A-Z]+_NOTES)\b")
SHARED = "../" + "shared"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools keeps a build/ folder in the source tree, and a stale one
    # would carry modules that no longer exist into the wheel.
    source = tmp_path_factory.mktemp("source") / "mcad"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo_out"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, text=True, cwd=source)
    (path,) = out.glob("mcad-*.whl")
    return path


def test_wheel_adds_only_mcad(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mcad"}
    for package in ("storage", "student", "pipeline", "jobs", "jobs/cli", "jobs/bench", "pipeline/shapes"):
        assert f"mcad/{package}/__init__.py" in names, package
    assert "mcad/pipeline/shapes/demo_teachers/dual/model.safetensors" in names  # the demo teachers ship
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mcad = mcad.jobs.cli:main" in entry


def test_version_is_the_distribution_version():
    from importlib.metadata import version

    assert mcad.__version__ == version("mcad")


@pytest.mark.ray
def test_installed_wheel_runs_a_teacher_pass_away_from_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    # torch, ray, transformers, ... from this environment, as a plain path: its .pth files (the
    # editable install of this checkout among them) are not run, so only the wheel provides mcad.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="mcad-whl-", dir="/tmp")  # short: Ray's socket paths

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    where = run(str(python), "-c", "import mcad.storage, mcad.pipeline.shapes as s; "
                "print(mcad.storage.__file__); print(s.DEMO_TEACHERS)").split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    for name in ("jobs", "pipeline", "storage", "student"):  # nothing else claims the generic names
        assert not (site / name).exists()
    assert "teacher-pass" in run(str(venv / "bin" / "mcad"), "pipeline", "--help")
    mcad_cli = str(venv / "bin" / "mcad")
    run(mcad_cli, "data", "synth", "--out", "data", "--train", "40", "--val", "8", "--test", "8",
        "--shard-size", "20")
    teachers = Path(where[1])
    try:
        run(mcad_cli, "pipeline", "teacher-pass", "--data", "data/train", "--dual", str(teachers / "dual"),
            "--single", str(teachers / "single"), "--out", "store", "--pool", "8", "--topk", "4", "--workers", "1")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert sorted(p.name for p in (tmp_path / "store" / "signals").iterdir()) == ["000000.parquet", "000001.parquet"]


def test_nothing_in_the_repository_points_outside_it():
    """Every document a tracked file names is a tracked file (design points cite docs/design.md)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    present = {Path(name).name for name in tracked} | {Path(name).stem for name in tracked}
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".sh", ".txt", ".cfg"):
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {doc}" for doc in DOCUMENT.findall(text) if doc not in present]
        # A path into the workplace's shared notes, even to a name the repository also has (README.md).
        if SHARED in text:
            hits.append(f"{name}: {SHARED}")
    assert hits == []
    assert "docs/design.md" in tracked
