"""What a sweep searches: one TrainConfig field, a log-uniform range or a grid, and the values tried first.

A `SearchSpace` owns everything the sweep reads from it: its Ray Tune domain (`domain`), the
value the sweep clock calibrates with when nothing is evaluated first (`middle`), the points
Optuna evaluates before its own proposals (`initial`), the paper's value drawn beside the
results (`paper`), and its form in raven_sweep.json (`to_dict`, `from_dict`, which also reads
the dict of raven before this module). `PaperValues` is what the paper says of a parameter,
from which an entry script picks its initial points (`--initial paper|paper-grid|none`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ray import tune

from raven.config import ConfigError

INITIAL_CHOICES = ("paper", "paper-grid", "none")


@dataclass(frozen=True)
class PaperValues:
    """A parameter's values in the paper: the one it selected per data set, and the grid it searched."""

    selected: Mapping[str, float]
    grid: tuple[float, ...]

    def pick(self, initial: str, dataset: str) -> tuple[float, ...]:
        """The initial points `--initial` names: 'paper' (the value selected for `dataset`), 'paper-grid', 'none'."""
        assert initial in INITIAL_CHOICES, initial
        if initial == "none":
            return ()
        return (float(self.selected[dataset]),) if initial == "paper" else tuple(map(float, self.grid))


@dataclass(frozen=True)
class SearchSpace:
    """One searched TrainConfig field `param`: log-uniform in [low, high], or a grid of `values` (a categorical).

    `initial` values outside the space are left out (the paper's grid, partly outside a narrowed
    range); the others are evaluated first, in order. Build one with `log_uniform` or `grid`.
    """

    param: str
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = ()
    initial: tuple[float, ...] = ()
    paper: float | None = None  # the paper's selected value on this sweep's data set, if it has one

    @classmethod
    def log_uniform(cls, param: str, low: float, high: float, initial: Sequence[float] = (),
                    paper: float | None = None) -> "SearchSpace":
        return cls(param, low=low, high=high, initial=tuple(initial), paper=paper)

    @classmethod
    def grid(cls, param: str, values: Sequence[float], initial: Sequence[float] = (),
             paper: float | None = None) -> "SearchSpace":
        return cls(param, values=tuple(values), initial=tuple(initial), paper=paper)

    def __post_init__(self) -> None:
        finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if self.values:
            if self.low is not None or self.high is not None:
                raise ConfigError(f"the {self.param} space is a range or a grid, not both")
            if not all(finite(v) and v > 0 for v in self.values) or len(set(self.values)) != len(self.values):
                raise ConfigError(f"the {self.param} grid must hold distinct finite numbers > 0, "
                                  f"got {list(self.values)}")
            object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        elif not (finite(self.low) and finite(self.high) and 0 < self.low < self.high):
            raise ConfigError(f"the {self.param} range must satisfy 0 < low < high, got [{self.low}, {self.high}]")
        else:
            object.__setattr__(self, "low", float(self.low))
            object.__setattr__(self, "high", float(self.high))
        object.__setattr__(self, "initial", tuple(float(v) for v in self.initial if float(v) in self))

    @property
    def is_log_uniform(self) -> bool:
        """A range searched log-uniformly (not a grid): its runs also log log10 of the value, an axis for MLflow."""
        return not self.values

    def __contains__(self, value: float) -> bool:
        return value in self.values if self.values else self.low <= value <= self.high

    def __str__(self) -> str:
        if self.values:
            return f"grid {{{', '.join(f'{v:g}' for v in self.values)}}}"
        return f"log-uniform in [{self.low:g}, {self.high:g}]"

    def domain(self):
        """The Ray Tune domain Optuna samples from."""
        return tune.choice(list(self.values)) if self.values else tune.loguniform(self.low, self.high)

    @property
    def middle(self) -> float:
        """A value inside the space: the grid's middle one, or the range's geometric mean."""
        return self.values[len(self.values) // 2] if self.values else math.sqrt(self.low * self.high)

    @property
    def ends(self) -> tuple[float, ...]:
        """The values a sweep may train at its extremes (the grid, or both ends of the range)."""
        return self.values or (self.low, self.high)

    def points_to_evaluate(self) -> list[dict[str, float]] | None:
        """The initial points as Tune's searchers take them (None: none)."""
        return [{self.param: v} for v in self.initial] or None

    def describe(self) -> dict[str, Any]:
        """The space as the parent run's params (search.space.*): type and range or values, the paper's value."""
        shape = {"type": "choice", "values": list(self.values)} if self.values else \
            {"type": "loguniform", "low": self.low, "high": self.high}
        return shape if self.paper is None else {**shape, "paper": self.paper}

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, **self.describe(), "initial": list(self.initial)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], param: str | None = None,
                  initial: Sequence[float] | None = None) -> "SearchSpace":
        """Read `to_dict`'s form, or the dict of raven before this module, {"type": "loguniform", "low", "high"}
        or {"type": "choice", "values"}, whose param and initial points were SweepSpec fields (given here)."""
        param = values.get("param", param)
        initial = values.get("initial", initial or ())
        if values["type"] == "choice":
            return cls.grid(param, values["values"], initial, values.get("paper"))
        if values["type"] == "loguniform":
            return cls.log_uniform(param, values["low"], values["high"], initial, values.get("paper"))
        raise ValueError(f"unknown search space type {values['type']!r}")
