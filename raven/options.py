"""Typed options: a config field with its flag, default, help and check, in one place.

`Option` is how a method declares the TrainConfig fields it reads (raven.methods): the
registry gathers them, TrainConfig gains them as fields, `raven train` as flags. The checks
raise ConfigError with one line naming the field, before any data is read.
"""

from __future__ import annotations

import math
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
