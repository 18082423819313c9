"""The CLI surface: every command answers --help with examples, quickly, without heavy imports."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error, invoke
from mcad.jobs.cli import main


def _commands(group: click.Group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(main))


def test_the_design_cli_is_there():
    for path in [("demo",), ("data", "synth"), ("teachers", "bootstrap"), ("pipeline", "teacher-pass"),
                 ("pipeline", "train-student"), ("signals", "stats"), ("signals", "validate"),
                 ("signals", "sql"), ("eval",), ("bench", "store")]:
        assert path in COMMANDS, path


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_has_examples(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command = main
    for name in path:
        command = command.commands[name]
    if not isinstance(command, click.Group):
        assert "Examples:" in result.output


LEAVES = [path for path in COMMANDS if not isinstance(main.get_command(None, path[0]), click.Group) or len(path) > 1]
# Commands whose options take their defaults from config dataclasses (read when --help shows them).
FIELD_DEFAULTS = {("pipeline", "teacher-pass"), ("pipeline", "train-student"), ("pipeline", "sweep"), ("demo",),
                  ("bench", "student"), ("bench", "teacher-pass"), ("bench", "presets"), ("bench", "sweep"),
                  ("bench", "report"), ("bench", "store")}


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_help_imports_nothing_heavy(path):
    """--help shows the defaults (read from the config dataclasses) without heavy imports."""
    code = ("import sys; from click.testing import CliRunner; from mcad.jobs.cli import main; "
            f"r = CliRunner().invoke(main, [*{list(path)!r}, '--help']); assert r.exit_code == 0, r.output; "
            f"assert {path in FIELD_DEFAULTS!r} <= ('[default: ' in r.output); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'duckdb', 'pyarrow', 'webdataset', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_jobs_imports_ray():
    """Every library package imports with Ray made unimportable."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import importlib, pkgutil\n"
            "for pkg in ('mcad.storage', 'mcad.student', 'mcad.pipeline'):\n"
            "    mod = importlib.import_module(pkg)\n"
            "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    assert_one_line_error(invoke("signals", "stats", tmp_path))


@pytest.mark.parametrize("package, blocked", [
    ("mcad.storage", ("torch", "transformers", "PIL", "webdataset", "mcad.pipeline", "mcad.student", "mcad.jobs")),
    ("mcad.student", ("webdataset", "mcad.pipeline", "mcad.jobs")),
    ("mcad.pipeline", ("mcad.jobs",)),
])
def test_imports_run_one_way(package, blocked):
    """storage imports none of the others; student never imports pipeline; nothing imports jobs."""
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
            "import importlib, pkgutil\n"
            f"mod = importlib.import_module({package!r})\n"
            f"for info in pkgutil.walk_packages(mod.__path__, {package!r} + '.'):\n"
            "    importlib.import_module(info.name)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
