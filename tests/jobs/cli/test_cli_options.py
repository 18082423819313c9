"""jobs/cli/options.py: option defaults come from the config dataclasses, read only when needed."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.jobs.cli.options import FieldOption, field_option


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
