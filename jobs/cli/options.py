"""Options whose default is a config dataclass field's: the default is written once, in the dataclass.

`field_option("mcad.jobs.teacher_pass_job:TeacherPassJob", "--pool", "pool_size", type=int)`
is `click.option` with the default of `TeacherPassJob.pool_size`. The class is
imported when the default is first needed (a run, or --help, which shows it),
so this module, like every module of jobs/cli/, imports only click and the
stdlib at module level.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import click


def field_default(config: str, name: str) -> Callable[[], Any]:
    """A function returning the default of field `name` of the dataclass `config` ("module:Class")."""
    def read() -> Any:
        module, _, cls = config.partition(":")
        fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
        if name not in fields:
            raise TypeError(f"{config} has no field {name!r}")
        field = fields[name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise TypeError(f"{config}.{name} has no default")

    return read


class FieldOption(click.Option):
    """A click option whose default is read from a config dataclass field (see the module doc)."""

    def __init__(self, *decls, config: str, field: str | None = None, **kwargs):
        if "type" not in kwargs:  # click guesses a type from the default, which is not known yet
            raise TypeError(f"field_option {decls}: give its type")
        kwargs.setdefault("show_default", True)
        super().__init__(*decls, **kwargs)
        self.default = field_default(config, field or self.name)

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return super().get_default(ctx, call=True)  # --help shows the value, not "(dynamic)"


def field_option(config: str, *decls: str, field: str | None = None, **kwargs) -> Callable:
    """click.option(*decls, **kwargs) with the default of `config`'s field (the option's name,
    or `field`); `type` is required."""
    return click.option(*decls, cls=FieldOption, config=config, field=field, **kwargs)


class IntList(click.ParamType):
    """N,N,...: integers separated by commas, as a tuple ("0,1,2" -> (0, 1, 2)); empty parts are
    skipped, so "" is (). A default that is already a tuple or list passes through as ints."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(int(x) for x in value)
        try:
            return tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"{value!r} is not integers separated by commas (e.g. 0,1,2)", param, ctx)


def report_to_option(where: str) -> Callable:
    """`--report-to tensorboard`: the runs' metrics also as TensorBoard event files (`where` says which)."""
    return click.option(
        "--report-to", "report_to", multiple=True, type=click.Choice(["tensorboard"]),
        help=f"Also log to TensorBoard: {where} (needs the tensorboard package: pip install 'mcad[tensorboard]').")
