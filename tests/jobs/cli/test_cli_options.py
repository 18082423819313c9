"""jobs/cli/options.py: option defaults come from the config dataclasses, read only when needed."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.jobs.cli.options import FieldOption, IntList, field_option
from helpers import assert_one_line_error


@dataclasses.dataclass(frozen=True)
class Toy:
    size: int = 7
    names: tuple = dataclasses.field(default_factory=lambda: ("a", "b"))


def _toy_command():
    @click.command()
    @field_option(f"{__name__}:Toy", "--size", type=int, help="How big.")
    @field_option(f"{__name__}:Toy", "--names", type=str, multiple=True)
    def toy(size, names):
        click.echo(f"{size} {','.join(names)}")

    return toy


def test_the_default_is_the_dataclass_field_and_help_shows_it(monkeypatch):
    toy = _toy_command()
    assert CliRunner().invoke(toy, []).output == "7 a,b\n"
    assert CliRunner().invoke(toy, ["--size", "3"]).output == "3 a,b\n"
    assert "[default: 7]" in CliRunner().invoke(toy, ["--help"]).output
    # Read when needed, from the class: change the field's default and the option follows.
    monkeypatch.setattr(Toy.__dataclass_fields__["size"], "default", 9)
    assert CliRunner().invoke(toy, []).output == "9 a,b\n"


def test_a_field_the_class_lacks_fails_loudly():
    @click.command()
    @field_option(f"{__name__}:Toy", "--colour", type=str)
    def bad(colour):
        pass

    result = CliRunner().invoke(bad, [])
    assert isinstance(result.exception, TypeError) and "no field 'colour'" in str(result.exception)


def test_a_type_is_required():
    with pytest.raises(TypeError, match="give its type"):
        field_option(f"{__name__}:Toy", "--size")(lambda size: None)


def _field_options(group: click.Group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _field_options(command, (*path, name))
        else:
            yield from (((*path, name), p) for p in command.params if isinstance(p, FieldOption))


def test_every_field_option_names_a_real_field():
    seen = 0
    for path, param in _field_options(main):
        with click.Context(click.Command("x")) as ctx:
            param.get_default(ctx)  # raises TypeError for a field the dataclass lacks
        seen += 1
    assert seen >= 40


def test_teacher_pass_takes_pair_batch():
    from mcad.jobs.teacher_pass_job import TeacherPassJob

    command = main.commands["pipeline"].commands["teacher-pass"]
    names = {opt for p in command.params for opt in p.opts}
    assert "--pair-batch" in names and "--batch-size" not in names
    assert "pair_batch" in {f.name for f in dataclasses.fields(TeacherPassJob)}


def test_report_render_does_not_import_report():
    code = ("import sys; import mcad.jobs.bench.report_render; "
            "print('mcad.jobs.bench.report' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _ints_command():
    @click.command()
    @click.option("--seeds", type=IntList(), default="")
    @click.option("--budgets", type=IntList(), default=None)
    def ints(seeds, budgets):
        click.echo(f"{seeds!r} {budgets!r}")

    return ints


@pytest.mark.parametrize("args, echoed", [
    ([], "() None"),                                          # "" is (); a None default stays None
    (["--seeds", "0,1,2"], "(0, 1, 2) None"),
    (["--seeds", " 3, 4 ,,"], "(3, 4) None"),                 # blanks around and empty parts are skipped
    (["--budgets", "6,10,15"], "() (6, 10, 15)"),
    (["--budgets", ""], "() ()"),                             # '' is (): e.g. --epoch-budgets '' skips
    (["--seeds", "-1"], "(-1,) None"),
])
def test_int_list_parses_comma_separated_ints(args, echoed):
    result = CliRunner().invoke(_ints_command(), args)
    assert result.exit_code == 0, result.output
    assert result.output == echoed + "\n"
    assert IntList().convert((1, "2"), None, None) == (1, 2)  # a default already a tuple


@pytest.mark.parametrize("bad", ["0,x", "1.5", "a", "1;2"])
def test_int_list_refuses_anything_else_as_a_usage_error(bad):
    result = CliRunner().invoke(_ints_command(), ["--seeds", bad])
    assert result.exit_code == 2 and "Invalid value for '--seeds'" in result.output
    assert f"{bad!r} is not integers separated by commas" in result.output


def test_int_list_options_refuse_in_one_line(tmp_path):
    runner = CliRunner()
    synth = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "d"), "--hold-out-seeds", "0,x"])
    assert_one_line_error(synth, "--hold-out-seeds", "'0,x' is not integers")
    select = runner.invoke(main, ["bench", "select", "--store", "s", "--data", "d", "--val-data", "v",
                                  "--out", str(tmp_path / "sel"), "--epoch-budgets", "6,ten"])
    assert_one_line_error(select, "--epoch-budgets", "'6,ten' is not integers")
    assert list(tmp_path.iterdir()) == []


def test_teacher_profile_dtype_is_checked_once_in_one_line(tmp_path):
    from mcad.jobs.bench.teacher_profile import DTYPES, run_profile
    from mcad.jobs.bench.teacher_pass import TeacherPassBenchConfig
    from mcad.storage.errors import InputError

    result = CliRunner().invoke(main, ["bench", "teacher-pass", "--profile", "--size", "smoke", "--dtype", "float64",
                                       "--dir", str(tmp_path)])
    assert_one_line_error(result, "--dtype 'float64'", ", ".join(DTYPES))
    assert list(tmp_path.iterdir()) == []  # refused before anything was built
    # The same check for Python callers, before the device's (here one that does not exist).
    with pytest.raises(InputError, match="float64"):
        run_profile(TeacherPassBenchConfig(size="smoke"), device="cuda:99", dtype="float64", workdir=str(tmp_path))
    help_ = CliRunner().invoke(main, ["bench", "teacher-pass", "--help"]).output
    assert all(dtype in help_ for dtype in DTYPES)
