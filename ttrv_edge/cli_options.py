"""Command-line options generated from ``TTRVConfig``, as TRL's CLI is generated from its GRPOConfig.

``config_options`` appends one ``--option`` per config field to a typer command: the field's help text, its type
and its default, taken from the dataclass (so no default is written twice), bool fields as ``--x/--no-x``,
Optional fields taking a value (default None), and fields listed in ``config.CHOICES`` as choices. The command
receives the values in ``**options`` and builds its config with ``TTRVConfig(**options)``. A field added to
``TTRVConfig`` becomes an option of every such command (``adapt``, ``eval``) without touching the commands.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Annotated

import typer
from rich.markup import escape

from .config import CHOICES, TTRVConfig

__all__ = ["CONFIG_PANEL", "config_default", "config_options", "option_help"]

CONFIG_PANEL = "TTRV options (TTRVConfig, ttrv_edge/config.py)"


def config_default(name: str):
    """The default of the config field ``name``, as the dataclass defines it."""
    field = next(f for f in dataclasses.fields(TTRVConfig) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def option_help(name: str) -> str:
    """The help text of the config field ``name``, escaped for rich (a ``[...]`` in it must print as written)."""
    return escape(TTRVConfig.help_text(name))


def _parameter(field: dataclasses.Field, annotation, default) -> inspect.Parameter:
    choices = CHOICES.get(field.name)
    if choices:
        annotation = typing.Literal[tuple(choices)]
    info = typer.Option(
        help=option_help(field.name),
        show_default="None" if default is None else True,
        rich_help_panel=CONFIG_PANEL,
    )
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(field.name, keyword, default=default, annotation=Annotated[annotation, info])


def config_options(defaults: dict | None = None):
    """Decorator: add every ``TTRVConfig`` field to the command's signature as an option; the command takes them in
    ``**options``. ``defaults`` overrides some defaults (the demo benchmark's tuned settings), by field name."""
    defaults = dict(defaults or {})
    hints = typing.get_type_hints(TTRVConfig)
    names = [f.name for f in dataclasses.fields(TTRVConfig) if f.init]
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise TypeError(f"config_options: {', '.join(unknown)} are not TTRVConfig fields")

    def wrap(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = sorted({p.name for p in own} & set(names))
        if clash:
            raise TypeError(f"{command.__name__}: options {', '.join(clash)} are TTRVConfig fields already")
        generated = [
            _parameter(f, hints[f.name], defaults.get(f.name, config_default(f.name)))
            for f in dataclasses.fields(TTRVConfig)
            if f.init
        ]
        command.__signature__ = signature.replace(parameters=[*own, *generated])
        return command

    return wrap
