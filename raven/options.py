"""Typed options: a config field with its flag, default, help and check, in one place.

`Option` is how a method declares the TrainConfig fields it reads (raven.methods): the
registry gathers them, TrainConfig gains them as fields, `raven train` as flags. The checks
raise ConfigError with one line naming the field, before any data is read.

`flag_field` does the same for the fields of other config dataclasses (raven.eval.evaluate.EvalConfig,
raven.reproduce.grid.Budget): `add_field_flags` makes their flags, so a flag cannot drift from its field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A user-supplied setting is out of range; the message is meant to be shown as is."""


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Any) -> Any:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Option:
    """A TrainConfig field declared by a method.

    `check(value, values)` returns the value to store (a default resolved, a type normalised) or
    raises ConfigError; `values` holds every field of the config being built, the other options
    already checked in declaration order. `per_member`: the value may differ between the
    members of a pack, and reaches the step as a (K, 1) tensor (raven.pack.PackSettings).
    `row(value, latent_dim)` gives a member's row of that tensor (default: the value itself).
    `parse` turns the flag's text into a value (default: the type of `default`, float for None).
    """

    name: str
    default: Any
    help: str
    check: Callable[[Any, dict[str, Any]], Any]
    per_member: bool = False
    row: Callable[[Any, int], Any] | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# ----------------------------------------------------------------------------- flags made from dataclass fields


def flag_field(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
               choices: tuple[str, ...] | None = None, metavar: str | None = None,
               off: tuple[str, str] | None = None) -> Any:
    """A field of a config dataclass that is also a command-line flag (--field-name), its default and help here.

    A bool field that defaults to True is the flag --no-field-name (False is --field-name). A tuple
    field takes comma-separated values. `off`: (flag, help) of a second flag that sets the field to None
    (e.g. --no-early-stopping for patience). `add_field_flags` makes the flags, `field_flag_values`
    reads back the ones given.
    """
    meta = {"help": help, "choices": choices, "metavar": metavar, "off": off}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"flag": meta})


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base(hint: Any) -> Any:
    """The type of an optional field's hint (int | None -> int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_field_flags(parser: Any, cls: type, *, shown: dict[str, Any] | None = None, label: str = "default") -> None:
    """A flag for every `flag_field` of the dataclass `cls`, in field order.

    Every flag defaults to None, so that `field_flag_values` returns only what was given; the
    caller applies it over its own defaults. The help ends in "(LABEL VALUE)", VALUE from `shown`
    or the field's default, unless the help already names its default (or it is None or a bool).
    """
    shown = shown or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        meta, hint = f.metadata["flag"], hints[f.name]
        default = shown.get(f.name, f.default)
        text = meta["help"]
        if default is not None and not isinstance(default, bool) and default is not dataclasses.MISSING \
                and label not in text:
            text += f" ({label} {_show(default)})"
        if hint is bool:
            name = _flag_name(("no_" if f.default else "") + f.name)
            parser.add_argument(name, dest=f.name, action="store_const", const=not f.default, default=None,
                                help=text)
        else:
            base = _base(hint)
            kind = str if typing.get_origin(base) is tuple else base  # a tuple is split by field_flag_values
            parser.add_argument(_flag_name(f.name), dest=f.name, type=kind, default=None, choices=meta["choices"],
                                metavar=meta["metavar"], help=text)
        if meta["off"]:
            parser.add_argument(meta["off"][0], dest=f"{f.name}__off", action="store_true", help=meta["off"][1])


def field_flag_values(args: Any, cls: type) -> dict[str, Any]:
    """The `flag_field`s of `cls` given on the command line, as field values (tuples split at commas).

    A tuple flag that does not parse raises ConfigError naming the flag, in one line.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        value = getattr(args, f.name, None)
        if value is not None and typing.get_origin(_base(hints[f.name])) is tuple:
            item = typing.get_args(_base(hints[f.name]))[0]
            words = [w.strip() for w in value.split(",") if w.strip()]
            try:
                value = tuple(item(w) for w in words)
            except ValueError:
                value = ()
            if not value:
                kind = "numbers" if item in (int, float) else "names"
                raise ConfigError(f"{_flag_name(f.name)} expects comma-separated {kind}, got {getattr(args, f.name)!r}")
        if getattr(args, f"{f.name}__off", False):
            values[f.name] = None
        elif value is not None:
            values[f.name] = value
    return values
